"""Polysemanticity metrics per neuron, the baselines that say what its clusters mean, and a run summary.

Every unit of a layer gets a row and a `status`:

- `dead`: it never fires on the selected sign over the corpus (so it has no examples), or its embeddings are all
  zero (zero input weights: nothing to cluster by). It has no clusters.
- `few_examples`: fewer than `min_examples` examples, too few for a cluster count to mean anything.
- `live`: everything else. Only live units enter a polysemanticity summary; the summaries say how many units
  were left out, and why, and how many examples stand behind the figures.

Per live unit, next to its clusters (of x * w, the neuron embeddings):

- token identity: the adjusted Rand index between its clusters and the partition of its examples by the max
  token's id, and the share of its clusters whose examples all sit on one token. An ARI near 1 says the clusters
  are little more than "which token was it".
- input only: the same clustering (method, threshold) of the MLP inputs x themselves, without the weights; its
  cluster count and its agreement (ARI) with the clusters of x * w show what the neuron's weights add.
- stability: the mean ARI between the neuron's clusters and the clusters of random subsets of its examples
  (each a `fraction` of them, reclustered alone), over `resamples` subsets; 1 means every subset splits the same
  way, near 0 an unstable split.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from . import schemas
from .clustering import (NO_CLUSTER, _canonical_labels, cluster_labels, components, cosine_similarity_matrix, gram,
                         neuron_groups, row_norms, threshold_edges, unit_rows)
from .storage import load_tensors, parquet_provenance, provenance, read_parquet, write_parquet
from .tables import embedding_blocks, remake_from, store_rows

STATUSES = ("live", "few_examples", "dead")


def finite(values: Any) -> np.ndarray:
    """The finite values, as float64 (None, NaN and inf dropped)."""
    array = np.array([np.nan if v is None else v for v in np.asarray(values, dtype=object).ravel()], dtype=np.float64)
    return array[np.isfinite(array)]


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie); 1.0 when both put everything in one group."""
    if len(a) < 2:
        return 1.0
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    return adjusted_rand_codes(a_ids, b_ids)


def adjusted_rand_codes(a: np.ndarray, b: np.ndarray) -> float:
    """adjusted_rand of two labelings already coded as small non-negative integers (a code with no member counts
    nothing): the same number, without relabelling."""
    return float(adjusted_rand_many(a[None, :], b[None, :])[0])


def adjusted_rand_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """adjusted_rand of each row pair (a[r], b[r]) of two coded labelings (small non-negative integers), from one
    contingency count over all rows: the same numbers (the pair counts are whole, so exact in any order)."""
    count, n = a.shape
    if n < 2:
        return np.ones(count)
    height, width = int(a.max()) + 1, int(b.max()) + 1
    cells = (np.arange(count)[:, None] * height + a) * width + b

    def pairs(codes: np.ndarray, size: int) -> np.ndarray:
        counts = np.bincount(codes.ravel(), minlength=count * size).reshape(count, size).astype(np.float64)
        return (counts * (counts - 1) / 2).sum(1)

    both = pairs(cells, height * width)
    rows = pairs(np.arange(count)[:, None] * height + a, height)
    cols = pairs(np.arange(count)[:, None] * width + b, width)
    total = n * (n - 1) / 2
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    trivial = maximum == expected  # both partitions trivial (one group, or all singletons)
    return np.where(trivial, 1.0, (both - expected) / np.where(trivial, 1.0, maximum - expected))


def neuron_metrics(emb: np.ndarray, labels: np.ndarray, sim: np.ndarray | None = None) -> dict[str, Any]:
    """Size, clusters, and cosine-distance spread of one neuron's examples; None where undefined."""
    n = len(labels)
    n_clusters = int(labels.max()) + 1 if n else 0
    out = {
        "size": n,
        "n_clusters": n_clusters,
        "largest_cluster_share": float(np.bincount(labels).max() / n) if n else 0.0,
        "mean_distance": None, "max_distance": None, "mean_intra_distance": None, "mean_inter_distance": None,
    }
    if n < 2:
        return out
    # Distance sums from similarity sums (1 - mean similarity), per pair of clusters in one product: no pair masks.
    sim = (cosine_similarity_matrix(emb) if sim is None else sim).astype(np.float64)
    members = np.zeros((n, n_clusters))
    members[np.arange(n), labels] = 1.0
    sizes = members.sum(0)
    diagonal = float(np.trace(sim))
    all_pairs, intra_pairs = n * (n - 1) / 2, float((sizes * (sizes - 1) / 2).sum())
    all_sum = (float(sim.sum()) - diagonal) / 2
    intra_sum = (float(np.trace(members.T @ sim @ members)) - diagonal) / 2
    np.fill_diagonal(sim, np.inf)
    out.update(mean_distance=1.0 - all_sum / all_pairs, max_distance=float(1.0 - sim.min()))
    if intra_pairs:
        out["mean_intra_distance"] = 1.0 - intra_sum / intra_pairs
    if all_pairs > intra_pairs:
        out["mean_inter_distance"] = 1.0 - (all_sum - intra_sum) / (all_pairs - intra_pairs)
    return out


def token_identity(labels: np.ndarray, token_ids: np.ndarray) -> dict[str, float]:
    """How far a neuron's clusters are the partition of its examples by max-token id."""
    order = np.lexsort((token_ids, labels))
    first_of_cluster = np.r_[True, labels[order][1:] != labels[order][:-1]]
    new_token = first_of_cluster | np.r_[True, token_ids[order][1:] != token_ids[order][:-1]]
    distinct = np.add.reduceat(new_token.astype(np.int64), np.flatnonzero(first_of_cluster)) if len(labels) else np.zeros(0, int)
    single = (distinct == 1).tolist()
    ari = adjusted_rand(labels, token_ids) if len(labels) < 2 or labels.min() < 0 else adjusted_rand_codes(
        labels, np.unique(token_ids, return_inverse=True)[1].reshape(-1))  # canonical labels are codes already
    return {"ari_token": ari, "single_token_cluster_share": float(np.mean(single))}


def input_only(x: np.ndarray, labels: np.ndarray, threshold: float, method: str) -> dict[str, Any]:
    """The same clustering of the MLP inputs x alone, and its agreement with the clusters of x * w."""
    x_labels = cluster_labels(cosine_similarity_matrix(x), threshold, method)
    return {"n_clusters_input": int(x_labels.max()) + 1, "ari_input": adjusted_rand(labels, x_labels)}


def stability(sim: np.ndarray, labels: np.ndarray, threshold: float, method: str, resamples: int, fraction: float,
              rng: np.random.Generator) -> float | None:
    """Mean ARI between the clusters and those of `resamples` random subsets (`fraction` of the examples each)."""
    subsets = resample(len(labels), resamples, fraction, rng)
    if subsets is None:
        return None
    scores = [adjusted_rand(labels[subset], cluster_labels(sim[np.ix_(subset, subset)], threshold, method))
              for subset in subsets]
    return float(np.mean(scores))


def resample(n: int, resamples: int, fraction: float, rng: np.random.Generator) -> list[np.ndarray] | None:
    """The random subsets `stability` reclusters (sorted example indices), or None when there is none to draw."""
    size = int(round(fraction * n))
    if resamples <= 0 or size < 2 or size >= n:
        return None
    return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(resamples)]


def graph_baselines(emb: np.ndarray, sim: np.ndarray, margin: float, x: np.ndarray, unit_x: np.ndarray | None,
                    labels: np.ndarray, threshold: float, subsets: list[np.ndarray] | None) -> tuple[list[np.ndarray], Any]:
    """The threshold graphs behind input_only and stability for one neuron (x's, then one per subset: the induced
    subgraph of the neuron's own graph, which is what reclustering the subset alone gives), and a function that
    turns their components into the two baselines."""
    x_sim, x_margin = gram(x, unit_x)
    graphs: list[Any] = [threshold_edges(x, x_sim, x_margin, threshold)]
    if subsets is not None:
        # Each subset's graph: the neuron's edges between two of its members, on the neuron's node numbers (the
        # others are left isolated and not read back).
        n, i, j = threshold_edges(emb, sim, margin, threshold)
        inside = np.zeros((len(subsets), n), bool)
        for r, subset in enumerate(subsets):
            inside[r, subset] = True
        kept = inside[:, i] & inside[:, j]
        graphs.append((n * len(subsets), *[(np.arange(len(subsets))[:, None] * n + ends[None, :])[kept] for ends in (i, j)]))

    def finish(parts: list[np.ndarray]) -> dict[str, Any]:
        x_labels = _canonical_labels(parts[0])
        out: dict[str, Any] = {"n_clusters_input": int(x_labels.max()) + 1,  # both canonical: codes already
                               "ari_input": adjusted_rand_codes(labels, x_labels) if len(labels) >= 2 else 1.0}
        if subsets is None:
            out["stability"] = None
        else:  # component ids of one graph are consecutive: shifted to 0 they are codes
            ids = parts[1].reshape(len(subsets), -1)[np.arange(len(subsets))[:, None], np.stack(subsets)]
            scores = adjusted_rand_many(labels[np.stack(subsets)], ids - ids.min(1, keepdims=True))
            out["stability"] = float(np.mean(scores.tolist()))
        return out

    return graphs, finish


def unit_scores(state: dict[str, np.ndarray], sign: str) -> np.ndarray:
    """Each unit's largest score on the selected sign over the corpus (topk.score_max, without torch)."""
    high, low = state["stat_max"].astype(np.float64), state["stat_min"].astype(np.float64)
    return {"positive": high, "negative": -low}.get(sign, np.maximum(high, -low))


def layer_metrics(
    embeddings_path: str | os.PathLike,
    clusters_path: str | os.PathLike,
    selection_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
    *,
    min_examples: int,
    resamples: int,
    fraction: float,
    seed: int,
    weights_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """One row per unit of the layer (every neuron, or every latent of an SAE), with its status and baselines.

    The embeddings are streamed a block of neurons at a time (remade from the selection and `weights_path`, the
    embedding weights, when given: clustering.cluster_layer); the threshold graphs of a block's baselines (x alone,
    and every resample) go through one connected-components call."""
    clusters = read_parquet(clusters_path, schemas.CLUSTERS)
    settings = parquet_provenance(clusters_path).get("settings") or {}
    threshold, method = float(settings["threshold"]), str(settings["method"])
    labels = clusters.column("cluster").to_numpy()
    state, sel_meta = load_tensors(selection_path)
    sign = (sel_meta.get("cache_settings") or {}).get("sign", "positive")
    n_tokens = max(int(state["n_tokens"][0]), 1)
    n_units = len(state["stat_max"])
    fired = unit_scores(state, sign) > 0
    duplicates = state["duplicates"] if "duplicates" in state else np.zeros(n_units, np.int32)
    remake = remake_from(selection_path, weights_path)
    x_rows, x_store = (remake.x_rows, remake.store) if remake is not None else store_rows(selection_path)
    unit_store = unit_rows(x_store) if method == "threshold_graph" else None  # once per distinct x, not per example
    measured: dict[int, dict[str, Any]] = {}
    sizes: dict[int, int] = {}
    experts: dict[int, Any] = {}
    offset = 0
    for piece, emb in embedding_blocks(embeddings_path, ["neuron", "expert", "token_id"], remake):
        token_ids = piece.column("token_id").to_numpy()
        expert = piece.column("expert").to_pylist()
        live_groups = []
        for unit, start, stop in neuron_groups(piece.column("neuron").to_numpy()):
            sizes[unit], experts[unit] = stop - start, expert[start]
            unit_labels = labels[offset + start : offset + stop]
            if fired[unit] and not (unit_labels == NO_CLUSTER).any():
                live_groups.append((unit, start, stop))
        measured.update(block_metrics(emb, token_ids, labels[offset : offset + piece.num_rows],
                                      x_store[x_rows[offset : offset + piece.num_rows]], live_groups, threshold, method,
                                      seed, layer, resamples, fraction,
                                      None if unit_store is None else unit_store[x_rows[offset : offset + piece.num_rows]]))
        offset += piece.num_rows
    expert_of = _expert_lookup(experts, sel_meta)
    rows = []
    for unit in range(n_units):
        size = sizes.get(unit, 0)
        dead = unit not in measured
        status = "dead" if dead else ("few_examples" if size < min_examples else "live")
        row: dict[str, Any] = {"layer": layer, "neuron": unit, "expert": expert_of(unit), "status": status,
                               "duplicates": int(duplicates[unit])}
        row.update(dict(size=size, n_clusters=0, largest_cluster_share=0.0) if dead else measured[unit])
        row.update(
            max_activation=float(state["stat_max"][unit]),
            min_activation=float(state["stat_min"][unit]),
            mean_activation=float(state["stat_sum"][unit] / n_tokens),
            frac_positive=float(state["stat_positive"][unit] / n_tokens),
        )
        rows.append(row)
    out = pa.Table.from_pylist(rows, schema=schemas.METRICS)
    meta = provenance(
        "metrics",
        {"layer": layer, "min_examples": min_examples, "stability": {"resamples": resamples, "fraction": fraction,
                                                                    "seed": seed}},
        clustering=settings,
    )
    write_parquet(out, out_path, meta)
    return summarize_layer(out)


def block_metrics(emb: np.ndarray, token_ids: np.ndarray, labels: np.ndarray, x: np.ndarray,
                  groups: list[tuple[int, int, int]], threshold: float, method: str, seed: int, layer: int,
                  resamples: int, fraction: float, unit_x: np.ndarray | None = None) -> dict[int, dict[str, Any]]:
    """The metrics of the (not dead) units of a block of rows, each (unit, start, stop) of `groups` (`unit_x`: the
    rows of x scaled to unit norm, when the caller has them); each unit's resamples drawn from its own generator
    (seed, layer, unit), so a unit's figures do not depend on the blocks."""
    graph = method == "threshold_graph"
    unit_e = unit_rows(emb, row_norms(emb)) if emb.dtype == np.float32 else None
    if unit_x is None and graph and x.dtype == np.float32:
        unit_x = unit_rows(x)
    out: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, Any]] = []
    graphs: list[np.ndarray] = []
    for unit, start, stop in groups:
        rows = slice(start, stop)
        unit_labels = labels[rows]
        sim, margin = gram(emb[rows], None if unit_e is None else unit_e[rows])
        row = neuron_metrics(emb[rows], unit_labels, sim)
        row.update(token_identity(unit_labels, token_ids[rows]))
        subsets = resample(stop - start, resamples, fraction, np.random.default_rng([seed, layer, unit]))
        if graph:
            mine, finish = graph_baselines(emb[rows], sim, margin, x[rows], None if unit_x is None else unit_x[rows],
                                           unit_labels, threshold, subsets)
            pending.append((len(mine), finish))
            graphs += mine
        else:
            row.update(input_only(x[rows], unit_labels, threshold, method))
            exact = cosine_similarity_matrix(emb[rows]) if emb.dtype == np.float32 else sim
            if subsets is None:
                row["stability"] = None
            else:  # canonical labels are codes already: one contingency count for every subset
                scores = adjusted_rand_many(np.stack([unit_labels[s] for s in subsets]),
                                            np.stack([cluster_labels(exact[np.ix_(s, s)], threshold, method) for s in subsets]))
                row["stability"] = float(np.mean(scores.tolist()))
        out[unit] = row
    if graph:
        parts, at = components(graphs), 0
        for (unit, _, _), (count, finish) in zip(groups, pending):
            out[unit].update(finish(parts[at : at + count]))
            at += count
    return out


def _expert_lookup(known: dict[int, Any], sel_meta: dict[str, Any]) -> Any:
    """unit -> its expert (None for a dense layer): from the embeddings rows (`known`), else the model's MoE layout."""
    experts = ((sel_meta.get("model") or {}).get("layout") or {}).get("experts")
    if not experts or "units" in (sel_meta.get("settings") or {}):
        return lambda unit: known.get(unit)
    routed = int(experts["n_experts"]) * int(experts["per_expert"])

    def expert(unit: int) -> int:
        return unit // int(experts["per_expert"]) if unit < routed else int(experts["n_experts"])

    return lambda unit: known.get(unit, expert(unit))


def live(metrics: pa.Table) -> pa.Table:
    """The units a polysemanticity figure is about (status live)."""
    import pyarrow.compute as pc

    return metrics.filter(pc.equal(metrics.column("status"), "live"))


def pick_neurons(metrics: pa.Table, count: int) -> tuple[list[int], list[int]]:
    """Most and least polysemantic live neurons: by clusters, then by mean distance."""
    rows = live(metrics).select(["neuron", "n_clusters", "mean_distance", "size"]).to_pylist()
    key = lambda r: (r["n_clusters"], r["mean_distance"] or 0.0, -r["neuron"])  # noqa: E731
    ordered = sorted(rows, key=key)
    most = [r["neuron"] for r in reversed(ordered[-count:])] if count else []
    least = [r["neuron"] for r in ordered[:count] if r["neuron"] not in most]
    return most, least


def _median(values: list[Any]) -> float | None:
    kept = finite(values)
    return float(np.median(kept)) if kept.size else None


def summarize_layer(metrics: pa.Table) -> dict[str, Any]:
    """Polysemanticity of the layer's live units, with how many units were left out and why."""
    status = metrics.column("status").to_pylist()
    kept = live(metrics)
    clusters = kept.column("n_clusters").to_numpy()
    sizes = kept.column("size").to_numpy()
    highest = metrics.column("max_activation").to_numpy()
    lowest = metrics.column("min_activation").to_numpy()
    return {
        "neurons": int(metrics.num_rows),
        "live": int(kept.num_rows),
        "left_out": {s: status.count(s) for s in STATUSES if s != "live"},
        "examples_per_live_neuron": {
            "median": float(np.median(sizes)) if sizes.size else None,
            "min": int(sizes.min()) if sizes.size else None,
            "total": int(sizes.sum()),
        },
        "duplicates_dropped": int(np.sum(metrics.column("duplicates").to_numpy())),
        "clusters_per_neuron_mean": float(clusters.mean()) if clusters.size else None,
        "clusters_per_neuron_median": float(np.median(clusters)) if clusters.size else None,
        "frac_polysemantic": float((clusters > 1).mean()) if clusters.size else None,
        "mean_distance_median": _median(kept.column("mean_distance").to_pylist()),
        "baselines": {
            "ari_token_median": _median(kept.column("ari_token").to_pylist()),
            "single_token_cluster_share_median": _median(kept.column("single_token_cluster_share").to_pylist()),
            "clusters_input_only_median": _median(kept.column("n_clusters_input").to_pylist()),
            "ari_input_median": _median(kept.column("ari_input").to_pylist()),
            "stability_median": _median(kept.column("stability").to_pylist()),
        },
        # units whose largest |activation| over the corpus is negative (gated MLPs: act(gate) * up)
        "negative_dominant_share": float((-lowest > highest).mean()) if highest.size else None,
    }


def run_summary(metrics_paths: dict[int, str | os.PathLike]) -> dict[str, Any]:
    layers = {}
    for layer, path in sorted(metrics_paths.items()):
        table = read_parquet(path, schemas.METRICS)
        layers[str(layer)] = {**summarize_layer(table), "clustering": parquet_provenance(path).get("clustering")}
    return {"layers": layers}


def interval(values: np.ndarray, statistic: Any, resamples: int, seed: int) -> dict[str, float | None]:
    """The statistic and its 95% percentile-bootstrap interval; the value itself as both ends when there is too
    little data (fewer than two values, or no spread) to resample."""
    from scipy.stats import bootstrap

    values = finite(values)
    if not values.size:
        return {"value": None, "low": None, "high": None}
    value = float(statistic(values))
    if values.size < 2 or resamples < 1 or np.all(values == values[0]):
        return {"value": value, "low": value, "high": value}
    result = bootstrap((values,), statistic, n_resamples=resamples, method="percentile", vectorized=False,
                       random_state=np.random.default_rng(seed), confidence_level=0.95)
    return {"value": value, "low": float(result.confidence_interval.low), "high": float(result.confidence_interval.high)}
