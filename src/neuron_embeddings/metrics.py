"""Polysemanticity metrics per neuron, from its embeddings and clusters, and a run summary."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from . import schemas
from .clustering import cosine_similarity_matrix, neuron_groups
from .embeddings import load_layer
from .storage import load_tensors, parquet_provenance, provenance, read_parquet, write_parquet


def neuron_metrics(emb: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Size, clusters, and cosine-distance spread of one neuron's examples; None where undefined."""
    n = len(labels)
    dist = 1.0 - cosine_similarity_matrix(emb)
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


def layer_metrics(
    embeddings_path: str | os.PathLike,
    clusters_path: str | os.PathLike,
    selection_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
) -> dict[str, Any]:
    table, emb = load_layer(embeddings_path)
    clusters = read_parquet(clusters_path, schemas.CLUSTERS)
    labels = clusters.column("cluster").to_numpy()
    state, _ = load_tensors(selection_path)
    n_tokens = max(int(state["n_tokens"][0]), 1)
    rows = []
    expert = table.column("expert").to_pylist()
    for neuron, start, stop in neuron_groups(table.column("neuron").to_numpy()):
        rows.append(
            {
                "layer": layer,
                "neuron": neuron,
                "expert": expert[start],
                **neuron_metrics(emb[start:stop], labels[start:stop]),
                "max_activation": float(state["stat_max"][neuron]),
                "min_activation": float(state["stat_min"][neuron]),
                "mean_activation": float(state["stat_sum"][neuron] / n_tokens),
                "frac_positive": float(state["stat_positive"][neuron] / n_tokens),
            }
        )
    out = pa.Table.from_pylist(rows, schema=schemas.METRICS)
    meta = provenance("metrics", {"layer": layer}, clustering=parquet_provenance(clusters_path).get("settings"))
    write_parquet(out, out_path, meta)
    return summarize_layer(out)


def summarize_layer(metrics: pa.Table) -> dict[str, Any]:
    clusters = metrics.column("n_clusters").to_numpy()
    mean_distance = np.array([v for v in metrics.column("mean_distance").to_pylist() if v is not None])
    highest = metrics.column("max_activation").to_numpy()
    lowest = metrics.column("min_activation").to_numpy()
    return {
        "neurons": int(metrics.num_rows),
        "clusters_per_neuron_mean": float(clusters.mean()) if clusters.size else None,
        "clusters_per_neuron_median": float(np.median(clusters)) if clusters.size else None,
        "frac_polysemantic": float((clusters > 1).mean()) if clusters.size else None,
        "mean_distance_median": float(np.median(mean_distance)) if mean_distance.size else None,
        # neurons whose largest |activation| over the corpus is negative (gated MLPs: act(gate) * up)
        "negative_dominant_share": float((-lowest > highest).mean()) if highest.size else None,
    }


def run_summary(metrics_paths: dict[int, str | os.PathLike]) -> dict[str, Any]:
    layers = {}
    for layer, path in sorted(metrics_paths.items()):
        table = read_parquet(path, schemas.METRICS)
        layers[str(layer)] = {**summarize_layer(table), "clustering": parquet_provenance(path).get("clustering")}
    return {"layers": layers}
