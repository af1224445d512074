"""Threshold sweep: clusters per neuron as a function of the similarity threshold, and the per-layer plots.

The count of feature clusters depends on the clustering threshold; the sweep reclusters every neuron of a layer
at a few thresholds (the configured method, same embeddings), so a reader can see how sensitive the
polysemanticity count is. `plot_layer` draws a layer's distributions for the Snakemake report, and
`summary_table` gathers the run's per-layer figures in one TSV. Both are about live units only (metrics.py).
A unit whose embeddings are all zero is not swept: it has no clusters at any threshold.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import schemas
from .clustering import (METHODS, average_linkage, clusters_at, cosine_similarity_matrix, exact_similarity, gram,
                         layer_zero_neurons, neuron_groups, row_norms, single_linkage, unit_rows, upper_triangle)
from .errors import PipelineError
from .figures import hist
from .metrics import live
from .storage import atomic_path, parquet_provenance, provenance, read_parquet, write_parquet
from .tables import embedding_blocks, remake_from


def threshold_sweep(
    embeddings_path: str | os.PathLike, out_path: str | os.PathLike, layer: int, thresholds: list[float], method: str,
    selection_path: str | os.PathLike | None = None, weights_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Clusters per unit at each threshold. One tree per unit serves every threshold: single linkage for the
    threshold graph (its components at t are the subtrees joined above similarity t), average linkage cut at each
    threshold for agglomerative. The embeddings are streamed a block of neurons at a time (remade from the selection
    and the embedding weights, when given: cluster_layer)."""
    if method not in METHODS:
        raise PipelineError(f"clustering.method: '{method}' is not one of {', '.join(METHODS)}")
    thresholds = sorted(float(t) for t in thresholds)
    neurons, counts, norms = [], [], []
    neuron_max: dict[int, float] = {}
    for piece, emb in embedding_blocks(embeddings_path, ["neuron"], remake_from(selection_path, weights_path)):
        block_norms = row_norms(emb)
        norms.append(block_norms)
        unit = unit_rows(emb, block_norms) if method == "threshold_graph" and emb.dtype == np.float32 else None
        for neuron, start, stop in neuron_groups(piece.column("neuron").to_numpy()):
            neuron_max[neuron] = float(block_norms[start:stop].max())
            neurons.append(neuron)
            rows = slice(start, stop)
            counts.append(cluster_counts(emb[rows], thresholds, method, None if unit is None else unit[rows]))
    dead = layer_zero_neurons(np.concatenate(norms) if norms else np.zeros(0), neuron_max)
    kept = [k for k, neuron in enumerate(neurons) if neuron not in dead]
    neurons, counts = [neurons[k] for k in kept], [counts[k] for k in kept]
    n = len(neurons)
    out = pa.Table.from_pydict(
        {
            "layer": pa.array(np.full(n * len(thresholds), layer), pa.int16()),
            "neuron": pa.array(np.repeat(neurons, len(thresholds)), pa.int32()),
            "threshold": pa.array(np.tile(thresholds, n), pa.float32()),
            "n_clusters": pa.array(np.array(counts, np.int32).reshape(-1), pa.int32()),
        },
        schema=schemas.SWEEP,
    )
    write_parquet(out, out_path, provenance("sweep", {"layer": layer, "thresholds": thresholds, "method": method}))
    return {"neurons": n, "thresholds": thresholds}


def cluster_counts(emb: np.ndarray, thresholds: list[float], method: str, unit: np.ndarray | None = None) -> list[int]:
    """How many clusters `method` finds in one neuron's examples at each threshold: the counts of
    clustering.cluster_labels on cosine_similarity_matrix, threshold by threshold, from one tree."""
    from scipy.spatial.distance import squareform

    n = len(emb)
    if n < 2:
        return [n] * len(thresholds)
    if method == "threshold_graph":
        sim, margin = gram(emb, unit)
        upper = upper_triangle(n)
        values = sim.reshape(-1)[upper].astype(np.float64)  # the condensed similarities, row by row
        if margin > 0:  # entries that float32 rounding could put across a threshold take their float64 value
            near = np.zeros(len(values), bool)
            for t in thresholds:
                near |= np.abs(values - t) <= margin
            near = np.flatnonzero(near)
            if len(near):
                values[near] = exact_similarity(emb, *np.divmod(upper[near], n))
        # Single linkage on -similarity: its merge heights are the maximum spanning tree's similarities, exactly
        # as given; the components of "similarity > t" are n minus the merges above t.
        joined = -single_linkage(-values, n)[:, 2]
        return [n - int(np.count_nonzero(joined > t)) for t in thresholds]
    dist = 1.0 - cosine_similarity_matrix(emb)
    np.fill_diagonal(dist, 0.0)
    tree = average_linkage(squareform(dist, checks=False), n)
    return [len(np.unique(clusters_at(tree, np.nextafter(1.0 - t, -np.inf)))) for t in thresholds]


def sweep_curve(sweep: pa.Table, units: Any = None) -> dict[str, list[float]]:
    """Per threshold: mean, 10/50/90th percentile of clusters per neuron, and the share with more than one; over
    `units` (e.g. the live ones) when given."""
    if units is not None:
        sweep = sweep.filter(pc.is_in(sweep.column("neuron"), pa.array(list(units), pa.int32())))
    threshold = sweep.column("threshold").to_numpy()
    counts = sweep.column("n_clusters").to_numpy()
    curve: dict[str, list[float]] = {k: [] for k in ("threshold", "mean", "p10", "p50", "p90", "frac_polysemantic")}
    for t in np.unique(threshold):
        c = counts[threshold == t]
        curve["threshold"].append(round(float(t), 6))
        curve["mean"].append(float(c.mean()))
        for q in (10, 50, 90):
            curve[f"p{q}"].append(float(np.percentile(c, q)))
        curve["frac_polysemantic"].append(float((c > 1).mean()))
    return curve


def plot_layer(
    metrics_path: str | os.PathLike,
    sweep_path: str | os.PathLike,
    similar_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
) -> dict[str, Any]:
    """A layer's four panels as one PNG: clusters per neuron, mean distance, the sweep, similar-feature links."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_units = read_parquet(metrics_path, schemas.METRICS)
    metrics = live(all_units)
    sweep = read_parquet(sweep_path, schemas.SWEEP)
    similar = read_parquet(similar_path, schemas.SIMILAR)
    threshold = (parquet_provenance(metrics_path).get("clustering") or {}).get("threshold")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=90)
    ax = axes[0, 0]
    hist(ax, metrics.column("n_clusters").to_numpy(), integer=True, empty_note="no live neurons", color="#4c72b0")
    ax.set(title=f"layer {layer}: feature clusters per live neuron ({metrics.num_rows} of {all_units.num_rows})",
           xlabel="clusters", ylabel="neurons")
    ax = axes[0, 1]
    hist(ax, metrics.column("mean_distance").to_pylist(), 30, empty_note="no live neuron with 2 examples",
         color="#dd8452")
    ax.set(title="mean pairwise cosine distance", xlabel="distance", ylabel="neurons")
    ax = axes[1, 0]
    curve = sweep_curve(sweep, metrics.column("neuron").to_pylist())
    if curve["threshold"]:
        ax.fill_between(curve["threshold"], curve["p10"], curve["p90"], color="#55a868", alpha=0.25, label="10-90th pct")
        ax.plot(curve["threshold"], curve["mean"], "o-", color="#55a868", label="mean")
        ax.plot(curve["threshold"], curve["p50"], "s--", color="#2d6a3e", label="median")
        if threshold is not None:
            ax.axvline(float(threshold), color="#c44e52", linestyle=":", label=f"configured {float(threshold):g}")
        ax.legend(fontsize=8)
    ax.set(title="threshold sweep", xlabel="cosine-similarity threshold", ylabel="clusters per neuron")
    ax = axes[1, 1]
    sims = similar.filter(pc.equal(similar.column("rank"), 0)).column("similarity").to_numpy()
    hist(ax, sims, 30, empty_note="no links", color="#8172b2")
    ax.set(title="similar features: best link per cluster", xlabel="cosine similarity of x", ylabel="clusters")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version string: same bytes every run
    plt.close(fig)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return {"bytes": len(buffer.getvalue())}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def summary_table(
    summary_path: str | os.PathLike,
    metrics_paths: dict[int, str | os.PathLike],
    sweep_paths: dict[int, str | os.PathLike],
    similar_paths: dict[int, str | os.PathLike],
    importance_paths: dict[int, str | os.PathLike],
    out_path: str | os.PathLike,
) -> dict[str, Any]:
    """The run at a glance, one row per layer (a TSV the Snakemake report shows as a table)."""
    summary = json.loads(open(summary_path).read())["layers"]
    rows = []
    for layer in sorted(sweep_paths):
        s = summary[str(layer)]
        units = live(read_parquet(metrics_paths[layer], schemas.METRICS)).column("neuron").to_pylist()
        curve = sweep_curve(read_parquet(sweep_paths[layer], schemas.SWEEP), units)
        similar = read_parquet(similar_paths[layer], schemas.SIMILAR)
        importance = read_parquet(importance_paths[layer], schemas.IMPORTANCE)
        linked = similar.group_by(["neuron", "cluster"]).aggregate([]).num_rows
        rows.append(
            {
                "layer": layer,
                "neurons": s["neurons"],
                "live": s["live"],
                "dead": s["left_out"]["dead"],
                "few_examples": s["left_out"]["few_examples"],
                "median_examples": s["examples_per_live_neuron"]["median"],
                "threshold": (s.get("clustering") or {}).get("threshold"),
                "clusters_per_neuron_mean": _rounded(s["clusters_per_neuron_mean"]),
                "clusters_per_neuron_median": s["clusters_per_neuron_median"],
                "frac_polysemantic": _rounded(s["frac_polysemantic"]),
                "mean_distance_median": _rounded(s["mean_distance_median"]),
                "negative_dominant_share": _rounded(s.get("negative_dominant_share")),
                **{key: _rounded(value) for key, value in s["baselines"].items()},
                "sweep_mean_clusters": " ".join(f"{t:g}:{m:.2f}" for t, m in zip(curve["threshold"], curve["mean"])),
                "clusters_with_similar_features": linked,
                "importance_examples": importance.num_rows,
                "importance_neurons": len(set(importance.column("neuron").to_pylist())),
            }
        )
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"], delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
    return {"layers": len(rows)}
