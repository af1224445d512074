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
from .clustering import NO_CLUSTER, cluster_labels, cosine_similarity_matrix, neuron_groups
from .storage import load_tensors, parquet_provenance, provenance, read_parquet, write_parquet
from .tables import read_embeddings, store_rows

STATUSES = ("live", "few_examples", "dead")


def finite(values: Any) -> np.ndarray:
    """The finite values, as float64 (None, NaN and inf dropped)."""
    array = np.array([np.nan if v is None else v for v in np.asarray(values, dtype=object).ravel()], dtype=np.float64)
    return array[np.isfinite(array)]


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie); 1.0 when both put everything in one group."""
    n = len(a)
    if n < 2:
        return 1.0
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    table = np.zeros((a_ids.max() + 1, b_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (a_ids, b_ids), 1)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), n * (n - 1) / 2
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one group, or all singletons)
        return 1.0
    return float((both - expected) / (maximum - expected))


def neuron_metrics(emb: np.ndarray, labels: np.ndarray, sim: np.ndarray | None = None) -> dict[str, Any]:
    """Size, clusters, and cosine-distance spread of one neuron's examples; None where undefined."""
    n = len(labels)
    dist = 1.0 - (cosine_similarity_matrix(emb) if sim is None else sim)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    same = labels[:, None] == labels[None, :]
    pairs, intra, inter = dist[upper], dist[upper & same], dist[upper & ~same]
    n_clusters = int(labels.max()) + 1 if n else 0
    return {
        "size": n,
        "n_clusters": n_clusters,
        "largest_cluster_share": float(np.bincount(labels).max() / n) if n else 0.0,
        "mean_distance": float(pairs.mean()) if pairs.size else None,
        "max_distance": float(pairs.max()) if pairs.size else None,
        "mean_intra_distance": float(intra.mean()) if intra.size else None,
        "mean_inter_distance": float(inter.mean()) if inter.size else None,
    }


def token_identity(labels: np.ndarray, token_ids: np.ndarray) -> dict[str, float]:
    """How far a neuron's clusters are the partition of its examples by max-token id."""
    single = [len(np.unique(token_ids[labels == c])) == 1 for c in np.unique(labels)]
    return {"ari_token": adjusted_rand(labels, token_ids), "single_token_cluster_share": float(np.mean(single))}


def input_only(x: np.ndarray, labels: np.ndarray, threshold: float, method: str) -> dict[str, Any]:
    """The same clustering of the MLP inputs x alone, and its agreement with the clusters of x * w."""
    x_labels = cluster_labels(cosine_similarity_matrix(x), threshold, method)
    return {"n_clusters_input": int(x_labels.max()) + 1, "ari_input": adjusted_rand(labels, x_labels)}


def stability(sim: np.ndarray, labels: np.ndarray, threshold: float, method: str, resamples: int, fraction: float,
              rng: np.random.Generator) -> float | None:
    """Mean ARI between the clusters and those of `resamples` random subsets (`fraction` of the examples each)."""
    n = len(labels)
    size = int(round(fraction * n))
    if resamples <= 0 or size < 2 or size >= n:
        return None
    scores = []
    for _ in range(resamples):
        subset = np.sort(rng.choice(n, size=size, replace=False))
        scores.append(adjusted_rand(labels[subset], cluster_labels(sim[np.ix_(subset, subset)], threshold, method)))
    return float(np.mean(scores))


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
) -> dict[str, Any]:
    """One row per unit of the layer (every neuron, or every latent of an SAE), with its status and baselines."""
    table, emb = read_embeddings(embeddings_path)
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
    x_rows, x_store = store_rows(selection_path)
    token_ids = table.column("token_id").to_numpy()
    expert_of = _expert_lookup(table, sel_meta)
    groups = {neuron: (start, stop) for neuron, start, stop in neuron_groups(table.column("neuron").to_numpy())}
    rows = []
    for unit in range(n_units):
        start, stop = groups.get(unit, (0, 0))
        unit_labels = labels[start:stop]
        dead = stop == start or not fired[unit] or bool((unit_labels == NO_CLUSTER).any())
        status = "dead" if dead else ("few_examples" if stop - start < min_examples else "live")
        row: dict[str, Any] = {"layer": layer, "neuron": unit, "expert": expert_of(unit), "status": status,
                               "duplicates": int(duplicates[unit])}
        if dead:
            row.update(size=stop - start, n_clusters=0, largest_cluster_share=0.0)
        else:
            sim = cosine_similarity_matrix(emb[start:stop])
            row.update(neuron_metrics(emb[start:stop], unit_labels, sim))
            row.update(token_identity(unit_labels, token_ids[start:stop]))
            row.update(input_only(x_store[x_rows[start:stop]], unit_labels, threshold, method))
            rng = np.random.default_rng([seed, layer, unit])
            row["stability"] = stability(sim, unit_labels, threshold, method, resamples, fraction, rng)
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


def _expert_lookup(table: pa.Table, sel_meta: dict[str, Any]) -> Any:
    """unit -> its expert (None for a dense layer): from the embeddings rows, else the model's MoE layout."""
    known = dict(zip(table.column("neuron").to_pylist(), table.column("expert").to_pylist()))
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
