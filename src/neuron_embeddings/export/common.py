"""What every export reads and how it writes: one layer's examples with their clusters, the corpus windows they
come from, and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import schemas
from ..errors import PipelineError
from ..storage import parquet_provenance, read_parquet, usual_mode
from ..tables import read_columns

# The embeddings columns the exports use (the embedding vectors themselves stay in the Parquet file).
EXAMPLE_COLUMNS = [
    "neuron", "example_rank", "sample", "token_index", "document", "doc_position", "token_id", "token",
    "activation", "context_tokens", "context_activations", "context_center",
]
CLUSTER_COLUMNS = ["cluster", "cluster_size", "is_central", "mean_similarity"]


@dataclass
class LayerExamples:
    """One layer's examples, sorted by neuron then example_rank, each with its cluster (clusters.parquet)."""

    layer: int
    table: pa.Table  # EXAMPLE_COLUMNS + CLUSTER_COLUMNS
    window_tokens: int
    model: dict[str, Any]  # the prepared model's manifest, as the embeddings' provenance records it
    cache_settings: dict[str, Any]
    n_units: int  # neurons of the layer (every one, with or without examples)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def orientation(self) -> np.ndarray:
        """Per example, +1 or -1: the sign of its activation at the max token. The exports show every example in
        the direction it was selected on (a gated MLP's negative examples flipped), so that its max token carries
        its largest value, as delphi and Neuronpedia expect of a latent."""
        return np.where(self.column("activation") < 0, -1.0, 1.0).astype(np.float32)


def read_layer(embeddings: str | os.PathLike, clusters: str | os.PathLike, layer: int) -> LayerExamples:
    emb = read_columns(embeddings, schemas.EMBEDDINGS, EXAMPLE_COLUMNS)
    clu = read_parquet(clusters, schemas.CLUSTERS).select(["neuron", "example_rank", *CLUSTER_COLUMNS])
    prov = parquet_provenance(embeddings)
    cache = prov.get("cache_settings") or {}
    model = prov.get("model") or {}
    if "window_tokens" not in cache or "n_neurons" not in model:
        raise PipelineError(f"{embeddings}: no cache settings or model in its provenance (written by another version?)")

    def keys(table: pa.Table) -> np.ndarray:
        return table.column("neuron").to_numpy().astype(np.int64) * 65536 + table.column("example_rank").to_numpy()

    key_e, key_c = keys(emb), keys(clu)
    order_e, order_c = np.argsort(key_e, kind="stable"), np.argsort(key_c, kind="stable")
    if len(key_e) != len(key_c) or not np.array_equal(key_e[order_e], key_c[order_c]):
        raise PipelineError(f"{clusters}: its (neuron, example_rank) rows differ from {embeddings}'s; rerun the clustering")
    table = emb.take(pa.array(order_e))
    clu = clu.take(pa.array(order_c))
    for name in CLUSTER_COLUMNS:
        table = table.append_column(schemas.CLUSTERS.field(name), clu.column(name))
    return LayerExamples(layer, table, int(cache["window_tokens"]), model, cache, int(model["n_neurons"]))


def read_metrics(path: str | os.PathLike) -> pa.Table:
    return read_parquet(path, schemas.METRICS)


def read_windows(corpus_shards: list[str | os.PathLike], wanted: np.ndarray, window_tokens: int,
                 pad_id: int) -> tuple[np.ndarray, pa.Table]:
    """The token ids of the wanted corpus windows (sorted global window indices) as a [len(wanted), T] int32
    array, padded with pad_id past a window's end, and their WINDOWS rows (window, document, doc_start, n_prefix)."""
    tokens = np.full((len(wanted), window_tokens), pad_id, dtype=np.int32)
    meta = []
    wanted_set = pa.array(wanted, pa.int64())
    for path in corpus_shards:
        table = read_parquet(path, schemas.WINDOWS)
        table = table.filter(pc.is_in(table.column("window"), value_set=wanted_set))
        if not table.num_rows:
            continue
        rows = np.searchsorted(wanted, table.column("window").to_numpy())
        ids = table.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(ids).to_numpy()
        flat = ids.flatten().to_numpy()
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tokens[np.repeat(rows, lengths), cols] = flat
        meta.append(table.select(["window", "document", "doc_start", "n_prefix"]))
    found = pa.concat_tables(meta) if meta else schemas_windows_meta().empty_table()
    found = found.sort_by("window")
    if found.num_rows != len(wanted):
        missing = np.setdiff1d(wanted, found.column("window").to_numpy())
        raise PipelineError(f"corpus windows {missing[:5].tolist()} of the examples are not in the corpus shards "
                            f"({len(missing)} missing): is this the run's corpus?")
    return tokens, found


def schemas_windows_meta() -> pa.Schema:
    return pa.schema([schemas.WINDOWS.field(name) for name in ("window", "document", "doc_start", "n_prefix")])


def pad_token_id(model_dir: str | os.PathLike) -> int:
    """The id that fills a short window's tail: the tokenizer's pad token, else its EOS, else 0."""
    from ..vocab import TokenTexts

    texts = TokenTexts(model_dir)
    for candidate in (texts.special_id("pad_token_id"), texts.special_id("eos_token_id")):
        if candidate is not None:
            return int(candidate)
    return 0


def finite_or_none(value: Any, digits: int | None = None) -> float | None:
    """A float for JSON: NaN and inf become null (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None else value


def json_line(record: dict[str, Any]) -> str:
    """One JSON line: strict JSON (no NaN), control characters in corpus text escaped, UTF-8 kept."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; it replaces `path` only if the block finishes, so a killed
    export leaves the previous folder or none (storage.atomic_path does the same for single files)."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, usual_mode(0o777))
    except OSError as exc:
        raise PipelineError(f"{final}: cannot write here ({exc.strerror or exc})") from None
    try:
        try:
            yield tmp
            for root, dirs, files in os.walk(tmp):
                for name in dirs:
                    os.chmod(os.path.join(root, name), usual_mode(0o777))
                for name in files:
                    os.chmod(os.path.join(root, name), usual_mode())
            if final.exists():
                old = final.with_name(f".{final.name}.old.tmp")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as exc:
            raise PipelineError(f"{final}: write failed, nothing written ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def folder_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """A small side table inside an export folder (the folder as a whole is written atomically)."""
    pq.write_table(table, path, compression="zstd")
