"""Per-neuron feature clusters from neuron embeddings.

The reference method (the paper's): cosine similarity between every pair of a neuron's examples, an edge
wherever it exceeds the threshold, connected components as clusters. `agglomerative` (average linkage on
cosine distance, cut at 1 - threshold) is offered for comparison. Clusters are numbered by size, largest
first (ties: the one holding the stronger example first), so labels are deterministic.

A neuron whose embeddings are all zero (its input weights are zero, so x * w carries nothing) has no direction
to cluster by: it gets no clusters (cluster -1, `NO_CLUSTER`) and the metrics mark it dead.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from . import schemas
from .errors import PipelineError
from .storage import parquet_provenance, provenance, write_parquet
from .tables import read_embeddings

METHODS = ("threshold_graph", "agglomerative")
NO_CLUSTER = -1  # the cluster of every example of a neuron with all-zero embeddings
ZERO_NORM = 1e-6  # an embedding this small against the layer's median norm counts as zero


def cosine_similarity_matrix(emb: np.ndarray) -> np.ndarray:
    emb = emb.astype(np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _canonical_labels(raw: np.ndarray) -> np.ndarray:
    """Renumber clusters: largest first, ties by their first (strongest) example."""
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    mapping = np.empty(ids.max() + 1, dtype=np.int64)
    mapping[ids[order]] = np.arange(len(ids))
    return mapping[raw]


def threshold_graph(sim: np.ndarray, threshold: float) -> np.ndarray:
    adjacency = sim > threshold
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(csr_matrix(adjacency), directed=False)
    return _canonical_labels(labels)


def agglomerative(sim: np.ndarray, threshold: float) -> np.ndarray:
    """Average linkage on cosine distance, merging while the linkage distance is below 1 - threshold (scikit-learn's
    AgglomerativeClustering with distance_threshold, computed with scipy: the same clusters, ~100x faster)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(sim) < 2:
        return np.zeros(len(sim), dtype=np.int64)
    dist = 1.0 - sim
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    return _canonical_labels(fcluster(tree, np.nextafter(1.0 - threshold, -np.inf), criterion="distance") - 1)


def cluster_labels(sim: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """Cluster labels from a cosine-similarity matrix (canonical numbering)."""
    if method not in METHODS:
        raise PipelineError(f"clustering.method: '{method}' is not one of {', '.join(METHODS)}")
    if len(sim) == 0:
        return np.zeros(0, dtype=np.int64)
    return threshold_graph(sim, threshold) if method == "threshold_graph" else agglomerative(sim, threshold)


def zero_norm_scale(emb: np.ndarray) -> float:
    """The norm below which a layer's embedding counts as zero: ZERO_NORM x the median nonzero row norm."""
    norms = np.linalg.norm(emb.astype(np.float64), axis=1) if emb.size else np.zeros(0)
    nonzero = norms[norms > 0]
    return float(ZERO_NORM * np.median(nonzero)) if nonzero.size else 0.0


def is_zero(emb: np.ndarray, scale: float) -> bool:
    """Whether every row of one neuron's embeddings is (numerically) zero."""
    return not emb.size or float(np.linalg.norm(emb.astype(np.float64), axis=1).max()) <= scale


def cluster_neuron(emb: np.ndarray, threshold: float, method: str = "threshold_graph") -> dict[str, np.ndarray]:
    """Cluster one neuron's examples (rows of emb, in rank order)."""
    if not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"clustering.threshold: {threshold} is outside [-1, 1]")
    sim = cosine_similarity_matrix(emb)
    labels = cluster_labels(sim, threshold, method)
    n = len(labels)
    sizes = np.bincount(labels)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    peers = same.sum(1)
    mean_sim = np.where(peers > 0, (sim * same).sum(1) / np.maximum(peers, 1), 1.0)
    central = np.zeros(n, dtype=bool)
    for cluster in range(len(sizes)):
        members = np.flatnonzero(labels == cluster)
        central[members[np.argmax(mean_sim[members])]] = True  # argmax keeps the first: the stronger example
    return {"cluster": labels, "cluster_size": sizes[labels], "is_central": central, "mean_similarity": mean_sim}


def neuron_groups(neuron: np.ndarray) -> list[tuple[int, int, int]]:
    """(neuron, start, stop) row ranges of a table sorted by neuron."""
    if len(neuron) == 0:
        return []
    ids, starts = np.unique(neuron, return_index=True)
    stops = np.append(starts[1:], len(neuron))
    return list(zip(ids.tolist(), starts.tolist(), stops.tolist()))


def cluster_layer(embeddings_path: str | os.PathLike, out_path: str | os.PathLike, layer: int, threshold: float, method: str) -> dict[str, Any]:
    if method not in METHODS:
        raise PipelineError(f"clustering.method: '{method}' is not one of {', '.join(METHODS)}")
    table, emb = read_embeddings(embeddings_path)
    neuron = table.column("neuron").to_numpy()
    scale = zero_norm_scale(emb)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("cluster", "cluster_size", "is_central", "mean_similarity")}
    dead = 0
    for _, start, stop in neuron_groups(neuron):
        if is_zero(emb[start:stop], scale):
            n, dead = stop - start, dead + 1
            result = {"cluster": np.full(n, NO_CLUSTER), "cluster_size": np.zeros(n), "is_central": np.zeros(n, bool),
                      "mean_similarity": np.full(n, np.nan)}
        else:
            result = cluster_neuron(emb[start:stop], threshold, method)
        for key in parts:
            parts[key].append(result[key])

    def joined(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(0, dtype)

    out = pa.Table.from_pydict(
        {
            "layer": table.column("layer"),
            "neuron": table.column("neuron"),
            "expert": table.column("expert"),
            "example_rank": table.column("example_rank"),
            "cluster": pa.array(joined("cluster", np.int32)),
            "cluster_size": pa.array(joined("cluster_size", np.int32)),
            "is_central": pa.array(joined("is_central", bool)),
            "mean_similarity": pa.array(joined("mean_similarity", np.float32)),
        },
        schema=schemas.CLUSTERS,
    )
    upstream = parquet_provenance(embeddings_path)
    meta = provenance("clustering", {"layer": layer, "threshold": threshold, "method": method}, model=upstream.get("model"))
    write_parquet(out, out_path, meta)
    return {"neurons": len(neuron_groups(neuron)), "zero_embedding_neurons": dead}
