"""The explorer: a static, self-contained site over a run that opens from disk (file://) or any static server.

Layout of the folder it writes:

    index.html, explorer.js, explorer.css      the page (package assets in explorer_assets/, copied verbatim)
    data/index.js                              the run: layers, settings, per-layer summaries and plots
    data/layer-L/neurons.js                    per neuron of layer L: metrics, sweep counts (for lists, plots)
    data/layer-L/search.js                     max-token text -> neurons (the token search), loaded on first use
    data/layer-L/block-NNNN.js                 neurons [NNNN * block_size, ...): clusters, examples, similar links

Data files are JavaScript that call `NE.register(key, {...})` with a JSON object, loaded on demand with a
<script> element: fetch() of local files is refused under file://, a script is not. So a page only ever loads
the blocks of the neurons looked at, and no file grows with the model (one block of a GPT2-small layer holds
64 of its 3,072 neurons).

All corpus text (tokens, document origins) is data: the JSON is written with every '<', '>' and '&' escaped,
and the page puts text into the DOM with textContent only, never as markup.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__, schemas
from .figures import finite
from .metrics import live, pick_neurons, summarize_layer
from .storage import load_tensors, parquet_provenance, read_parquet
from .sweep import sweep_curve
from .tables import display_order, read_columns

ASSETS = Path(__file__).parent / "explorer_assets"
ASSET_FILES = ("index.html", "explorer.js", "explorer.css")
METRIC_COLUMNS = (
    "expert", "status", "size", "duplicates", "n_clusters", "largest_cluster_share", "mean_distance", "max_distance",
    "mean_intra_distance", "mean_inter_distance", "ari_token", "single_token_cluster_share", "n_clusters_input",
    "ari_input", "stability", "max_activation", "min_activation", "mean_activation", "frac_positive",
)


@dataclass(frozen=True)
class ExplorerSettings:
    examples_per_cluster: int = 10  # shown per cluster, the central one first
    max_clusters: int = 30  # tabs per neuron, largest first
    context_before: int = 20  # tokens shown before the max token (at most selection.context_before)
    context_after: int = 10
    block_size: int = 64  # neurons per data file
    featured: int = 8  # the N most and N least polysemantic neurons listed per layer
    search_hits: int = 50  # neurons kept per token in the search index


@dataclass(frozen=True)
class LayerInputs:
    embeddings: str | os.PathLike
    clusters: str | os.PathLike
    metrics: str | os.PathLike
    importance: str | os.PathLike
    similar: str | os.PathLike
    sweep: str | os.PathLike
    selection: str | os.PathLike


def js_data(key: str, data: Any) -> str:
    """A data file: one registration call; no '<', '>' or '&' survives in the text, whatever the data holds."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"NE.register({json.dumps(key)},{text});\n"


def rounded(values: np.ndarray, scale: float, digits: int = 4) -> list[float]:
    """Round to `digits` significant digits of `scale` (the neuron's largest activation): small JSON."""
    return np.round(values.astype(np.float64), decimals_for(scale, digits)).tolist()


def decimals_for(scale: float, digits: int = 4) -> int:
    """The decimals that keep `digits` significant digits of `scale` (rounded's)."""
    return int(min(8, max(0, digits - 1 - math.floor(math.log10(scale))))) if scale > 0 else 3


def row_peaks(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row of a list column (its flat values and offsets), the largest |value|, NaN ignored (NaN for a row of
    none): np.nanmax of the row, for all rows at once."""
    lengths = np.diff(offsets)
    peaks = np.full(len(lengths), np.nan)
    filled = np.flatnonzero(lengths > 0)
    if len(filled):
        magnitude = np.abs(values[offsets[0] : offsets[-1]].astype(np.float64))
        peaks[filled] = np.fmax.reduceat(magnitude, offsets[filled] - offsets[0])
    return peaks


def finite_or_none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def histogram_counts(values: np.ndarray, bins: np.ndarray) -> list[int]:
    return np.histogram(values, bins=bins)[0].astype(int).tolist() if values.size else []


class LayerData:
    """One layer's tables, joined as the explorer needs them."""

    def __init__(self, layer: int, inputs: LayerInputs, settings: ExplorerSettings):
        self.layer, self.settings = layer, settings
        columns = ["neuron", "example_rank", "sample", "document", "doc_position", "token", "activation",
                   "context_tokens", "context_activations", "context_center"]
        self.emb = read_columns(inputs.embeddings, schemas.EMBEDDINGS, columns)
        self.clusters = read_parquet(inputs.clusters, schemas.CLUSTERS)
        self.metrics = read_parquet(inputs.metrics, schemas.METRICS)
        self.sweep = read_parquet(inputs.sweep, schemas.SWEEP)
        self.threshold = (parquet_provenance(inputs.clusters).get("settings") or {}).get("threshold")
        self.neuron = self.emb.column("neuron").to_numpy()
        self.rank = self.emb.column("example_rank").to_numpy()
        self.central = self.clusters.column("is_central").to_numpy(zero_copy_only=False)
        self.cluster = self.clusters.column("cluster").to_numpy()
        imp = read_parquet(inputs.importance, schemas.IMPORTANCE)
        # the rows are sorted by (neuron, example_rank): a row's number is a search away
        keys = self.neuron.astype(np.int64) * (1 << 16) + self.rank
        imp_keys = imp.column("neuron").to_numpy().astype(np.int64) * (1 << 16) + imp.column("example_rank").to_numpy()
        self.importance = dict(zip(np.searchsorted(keys, imp_keys).tolist(), imp.column("importance").to_pylist()))
        self.importance_neurons = sorted(set(imp.column("neuron").to_pylist()))
        centrals = np.flatnonzero(self.central)
        central_token = dict(zip(zip(self.neuron[centrals].tolist(), self.cluster[centrals].tolist()),
                                 self.emb.column("token").take(pa.array(centrals)).to_pylist()))
        self.similar: dict[tuple[int, int], list[list[Any]]] = {}
        sim = read_parquet(inputs.similar, schemas.SIMILAR)
        for n, c, on, oc, s in zip(*(sim.column(k).to_pylist() for k in ("neuron", "cluster", "other_neuron", "other_cluster", "similarity"))):
            self.similar.setdefault((n, c), []).append([on, oc, round(s, 3), central_token.get((on, oc), "")])
        state, _ = load_tensors(inputs.selection)
        self.cached_hist = state.get("stat_hist")
        self.hist_stride = int(state["hist_stride"][0]) if "hist_stride" in state else 1

    def neurons_file(self) -> dict[str, Any]:
        m = self.metrics
        sweep_counts = self.sweep.column("n_clusters").to_numpy()
        n_thresholds = len(set(self.sweep.column("threshold").to_pylist())) or 1
        most, least = pick_neurons(m, self.settings.featured)
        data: dict[str, Any] = {"neuron": m.column("neuron").to_pylist()}
        for name in METRIC_COLUMNS:
            values = m.column(name).to_pylist()
            kind = m.schema.field(name).type
            exact = pa.types.is_integer(kind) or pa.types.is_string(kind)
            data[name] = values if exact else [None if v is None or not math.isfinite(v) else round(v, 4) for v in values]
        sweep_neurons = self.sweep.column("neuron").to_numpy()[::n_thresholds].tolist()
        data["sweep"] = dict(zip(map(str, sweep_neurons), sweep_counts.reshape(-1, n_thresholds).tolist()))
        data["featured"] = {"most": most, "least": least}
        data["importance_neurons"] = self.importance_neurons
        return data

    def summary(self) -> dict[str, Any]:
        """The layer's figures over live units (metrics.summarize_layer), with the histograms the page draws."""
        kept = live(self.metrics)
        layer = summarize_layer(self.metrics)
        clusters = kept.column("n_clusters").to_numpy()
        distance = finite(kept.column("mean_distance").to_pylist())
        top = int(clusters.max(initial=1))
        distance_bins = np.linspace(0.0, max(1.0, float(distance.max(initial=0.0))), 31)
        return {
            "neurons": int(self.metrics.num_rows),
            "live": layer["live"],
            "left_out": layer["left_out"],
            "baselines": layer["baselines"],
            "threshold": self.threshold,
            "clusters_per_neuron_mean": layer["clusters_per_neuron_mean"],
            "frac_polysemantic": layer["frac_polysemantic"],
            "clusters_hist": {"start": 1, "counts": histogram_counts(clusters, np.arange(0.5, top + 1.5))},
            "distance_hist": {"edges": np.round(distance_bins, 4).tolist(), "counts": histogram_counts(distance, distance_bins)},
            "sweep": sweep_curve(self.sweep, kept.column("neuron").to_pylist()),
        }

    def search_file(self) -> dict[str, Any]:
        """Max-token text -> the neurons with most examples on it (count, best activation)."""
        grouped = (
            pa.table({"token": self.emb.column("token"), "neuron": self.emb.column("neuron"), "activation": self.emb.column("activation")})
            .group_by(["token", "neuron"])
            .aggregate([("activation", "count"), ("activation", "max")])
            .sort_by([("token", "ascending"), ("activation_count", "descending"), ("activation_max", "descending"), ("neuron", "ascending")])
        )
        tokens: list[str] = []
        hits: list[list[Any]] = []
        for token, neuron, count, best in zip(*(grouped.column(c).to_pylist() for c in ("token", "neuron", "activation_count", "activation_max"))):
            if not tokens or tokens[-1] != token:
                tokens.append(token)
                hits.append([])
            if len(hits[-1]) < 3 * self.settings.search_hits:
                hits[-1].extend([neuron, count, round(best, 3)])
        return {"tokens": tokens, "hits": hits}

    def histogram(self, neuron: int, acts: Any, scale: float) -> dict[str, Any]:
        """The neuron's activation histogram: the cached one, else one of `acts()` (its context activations)."""
        if self.cached_hist is not None:
            counts = self.cached_hist[neuron]
            nonzero = np.flatnonzero(counts)
            if nonzero.size:
                lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
                return {"kind": "cache", "first_bin": lo, "counts": counts[lo:hi].astype(int).tolist(), "stride": self.hist_stride}
        values = acts()
        values = values[np.isfinite(values)]
        if not values.size:
            return {"kind": "examples", "edges": [], "counts": []}
        edges = np.linspace(float(values.min()), float(values.max()) + 1e-9, 21)
        return {"kind": "examples", "edges": rounded(edges, scale), "counts": histogram_counts(values, edges)}

    def blocks(self, documents: list[str]) -> dict[int, dict[str, Any]]:
        """The per-block data files. Only the examples shown are turned into Python values (a GPT2-small layer has
        19M context tokens); each block's token vocabulary comes from one dictionary encoding of its shown tokens,
        which numbers them in order of first appearance."""
        s = self.settings
        acts = self.emb.column("context_activations").combine_chunks()
        toks = self.emb.column("context_tokens").combine_chunks()
        act_offsets = acts.offsets.to_numpy().astype(np.int64)
        act_values = acts.values.to_numpy(zero_copy_only=False)
        tok_offsets = toks.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(act_offsets)
        peaks = row_peaks(act_values, act_offsets)
        center = self.emb.column("context_center").to_numpy().astype(np.int64)
        activation = self.emb.column("activation").to_numpy()
        sample = self.emb.column("sample")
        document = self.emb.column("document").to_numpy()
        doc_position = self.emb.column("doc_position").to_numpy()
        size = self.clusters.column("cluster_size").to_numpy()
        mean_sim = self.clusters.column("mean_similarity").to_numpy()
        by_neuron: dict[int, list[np.ndarray]] = {}
        for rows in display_order(self.clusters):
            by_neuron.setdefault(int(self.neuron[rows[0]]), []).append(rows)
        in_block: dict[int, list[int]] = {}
        for neuron in by_neuron:
            in_block.setdefault(neuron // s.block_size, []).append(neuron)
        blocks: dict[int, dict[str, Any]] = {}
        for number, neurons in in_block.items():
            # every shown example of the block, in the order the files list them: (row, lo, hi) of its context
            shown_rows = [[rows[: s.examples_per_cluster] for rows in by_neuron[neuron][: s.max_clusters]] for neuron in neurons]
            flat = np.concatenate([r for per_neuron in shown_rows for r in per_neuron]).astype(np.int64)
            lo = np.maximum(0, center[flat] - s.context_before)
            hi = np.minimum(lengths[flat], center[flat] + s.context_after + 1)
            spans = np.maximum(hi - lo, 0)
            encoded = pc.dictionary_encode(toks.values.take(pa.array(spread(tok_offsets[flat] + lo, spans))))
            token_ids = np.split(encoded.indices.to_numpy(), np.cumsum(spans)[:-1])
            values = np.nan_to_num(act_values[spread(act_offsets[flat] + lo, spans)].astype(np.float64))
            samples = sample.take(pa.array(flat)).to_pylist()
            block = {"layer": self.layer, "vocab": encoded.dictionary.to_pylist(), "origins": {}, "neurons": {}}
            at = 0  # position in flat
            for neuron, clusters, shown in zip(neurons, (by_neuron[n] for n in neurons), shown_rows):
                neuron_rows = np.concatenate(clusters)
                scale = float(np.fmax.reduce(peaks[neuron_rows]))
                scale = scale if math.isfinite(scale) and scale > 0 else 1.0
                decimals = decimals_for(scale)
                count = sum(len(rows) for rows in shown)
                mine = slice(at, at + count)
                value_at = int(spans[:at].sum())
                neuron_values = np.round(values[value_at : value_at + int(spans[mine].sum())], decimals).tolist()
                strengths = np.round(activation[flat[mine]].astype(np.float64), decimals).tolist()
                value_starts = np.concatenate([[0], np.cumsum(spans[mine])]).tolist()
                cards = []
                for k in range(count):
                    i, j = int(flat[at + k]), at + k
                    c, start = int(center[i]), int(lo[j])
                    example = {
                        "r": int(self.rank[i]), "a": strengths[k], "c": c - start, "t": token_ids[j].tolist(),
                        "v": neuron_values[value_starts[k] : value_starts[k + 1]], "d": int(document[i]), "p": int(doc_position[i]),
                    }
                    if samples[j] not in ("top_k", "threshold"):
                        example["s"] = samples[j]
                    if i in self.importance:
                        example["i"] = np.round(np.asarray(self.importance[i][start : c + 1], np.float64), 3).tolist()
                    block["origins"].setdefault(str(int(document[i])), documents[int(document[i])])
                    cards.append(example)
                at += count
                listed, k = [], 0
                for rows in shown:
                    first = rows[0]
                    listed.append(
                        {
                            "id": int(self.cluster[first]),
                            "size": int(size[first]),
                            "mean_similarity": round(float(mean_sim[first]), 3),
                            "examples": cards[k : k + len(rows)],
                            "similar": self.similar.get((neuron, int(self.cluster[first])), []),
                        }
                    )
                    k += len(rows)

                def neuron_acts(rows: np.ndarray = neuron_rows) -> np.ndarray:
                    return act_values[spread(act_offsets[rows], lengths[rows])].astype(np.float64)

                block["neurons"][str(neuron)] = {
                    "scale": rounded(np.array([scale]), scale)[0],
                    "n_clusters": len(clusters),
                    "clusters": listed,
                    "hist": self.histogram(neuron, neuron_acts, scale),
                }
            blocks[number] = block
        return blocks


def spread(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices start, start + 1, ..., start + count - 1 of each (start, count), concatenated."""
    counts = np.maximum(counts, 0)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(total)


def compared_models(comparison_path: str | os.PathLike | None) -> dict[int, list[dict[str, Any]]]:
    """Per layer of the first model, the other models' figures at the matched layer (compare.compare_models)."""
    if not comparison_path:
        return {}
    comparison = json.loads(Path(comparison_path).read_text())
    first, others = comparison["models"][0], comparison["models"][1:]
    out: dict[int, list[dict[str, Any]]] = {}
    for row in comparison["rows"]:
        mine = row["models"].get(first)
        if mine is None:
            continue
        out[int(mine["layer"])] = [
            {"model": name, "description": comparison["descriptions"].get(name, ""), "layer": e["layer"],
             "live": e["live"], "neurons": e["neurons"], "clusters_median": e["clusters_median"],
             "frac_polysemantic": e["frac_polysemantic"], "ari_token_median": e["ari_token_median"]}
            for name in others if (e := row["models"].get(name)) is not None
        ]
    return out


def build_explorer(
    out_dir: str | os.PathLike,
    run: str,
    layers: dict[int, LayerInputs],
    documents_path: str | os.PathLike,
    settings: ExplorerSettings,
    importance_settings: dict[str, Any] | None = None,
    comparison_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the explorer folder whole, or not at all (built beside it, then renamed into place). With the run's
    comparison (several models), each layer's view shows the other models' figures at the matched layer."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    documents = read_parquet(documents_path, schemas.DOCUMENTS).column("origin").to_pylist()
    index: dict[str, Any] = {"run": run, "version": __version__, "layers": sorted(layers), "settings": asdict(settings),
                             "importance": importance_settings or {}, "summary": {}}
    compared = compared_models(comparison_path)
    files, largest = 0, 0
    try:
        for name in ASSET_FILES:
            shutil.copyfile(ASSETS / name, tmp / name)
        data = tmp / "data"
        for layer in sorted(layers):
            ld = LayerData(layer, layers[layer], settings)
            if "model" not in index:
                model = parquet_provenance(layers[layer].embeddings).get("model") or {}
                index["model"] = {k: model.get(k) for k in ("source", "architecture", "n_layers", "n_neurons", "d_model", "activation")}
                index["hist_edges"] = _hist_edges() if ld.cached_hist is not None else None
            index["summary"][str(layer)] = ld.summary()
            index["summary"][str(layer)]["compared"] = compared.get(layer, [])
            folder = data / f"layer-{layer}"
            folder.mkdir(parents=True)
            payloads = {"neurons": ld.neurons_file(), "search": ld.search_file()}
            payloads.update({f"block-{b:04d}": block for b, block in sorted(ld.blocks(documents).items())})
            for name, payload in payloads.items():
                text = js_data(f"layer-{layer}/{name}", payload)
                (folder / f"{name}.js").write_text(text, encoding="ascii")
                files, largest = files + 1, max(largest, len(text))
        text = js_data("index", index)
        (data / "index.js").write_text(text, encoding="ascii")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"data_files": files + 1, "largest_file_bytes": largest, "total_bytes": total}


def _hist_edges() -> list[float]:
    """topk.HIST_EDGES as the page shows them (6 significant digits), computed here with numpy: the explorer does
    not import torch for 51 numbers (tests/test_explorer.py checks that the two agree)."""
    edges = np.concatenate([-np.logspace(3, -3, 25), [0.0], np.logspace(-3, 3, 25)]).astype(np.float32)
    return [float(f"{v:.6g}") for v in edges.tolist()]
