"""Per-neuron feature clusters from neuron embeddings.

The reference method (the paper's): cosine similarity between every pair of a neuron's examples, an edge
wherever it exceeds the threshold, connected components as clusters. `agglomerative` (average linkage on
cosine distance, cut at 1 - threshold) is offered for comparison. Clusters are numbered by size, largest
first (ties: the one holding the stronger example first), so labels are deterministic.

A neuron whose embeddings are all zero (its input weights are zero, so x * w carries nothing) has no direction
to cluster by: it gets no clusters (cluster -1, `NO_CLUSTER`) and the metrics mark it dead.

Similarities of float32 embeddings are computed in float32 (a neuron's Gram matrix is most of the work, and
float32 is ~2x faster), and every entry that float32 rounding could put on the other side of a threshold is recomputed in float64: the
threshold graph, which only compares similarities with its threshold, gets the float64 labels. Average linkage
compares averages of similarities with each other, so `agglomerative` keeps float64 throughout.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from . import schemas
from .errors import PipelineError
from .storage import parquet_provenance, provenance, write_parquet
from .tables import embedding_blocks, remake_from

METHODS = ("threshold_graph", "agglomerative")
NO_CLUSTER = -1  # the cluster of every example of a neuron with all-zero embeddings
ZERO_NORM = 1e-6  # an embedding this small against the layer's median norm counts as zero


def cosine_similarity_matrix(emb: np.ndarray) -> np.ndarray:
    emb = emb.astype(np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def unit_rows(emb: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """The rows scaled to unit norm (a zero row stays zero), in the rows' precision; `norms`: their float64 norms
    (row_norms), when the caller has them."""
    norms = row_norms(emb) if norms is None else norms
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(emb.dtype)
    return emb * scale[:, None]


def gram(emb: np.ndarray, unit: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """A neuron's cosine-similarity matrix and how far any entry may be from cosine_similarity_matrix's: float32
    embeddings (as the pipeline stores them) get a float32 Gram matrix of their unit vectors (`unit`, when the
    caller has them), float64 ones exactly cosine_similarity_matrix (margin 0). The float32 matrix is symmetric
    (one syrk), so equal pairs stay equal."""
    if emb.dtype != np.float32:
        return cosine_similarity_matrix(emb), 0.0
    unit = unit_rows(emb) if unit is None else unit
    # A float32 dot product of d terms is within d * eps / 2 of the exact one (Cauchy-Schwarz bounds the terms),
    # plus the rounding of the unit vectors themselves: twice that leaves room.
    return np.clip(unit @ unit.T, -1.0, 1.0), (emb.shape[1] + 8) * float(np.finfo(np.float32).eps)


def exact_similarity(emb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of the row pairs (i, j), in float64 as cosine_similarity_matrix computes it (the rows
    involved only); symmetric: (i, j) and (j, i) give the same number."""
    rows, index = np.unique(np.concatenate([i, j]), return_inverse=True)
    exact = emb[rows].astype(np.float64)
    norms = np.linalg.norm(exact, axis=1, keepdims=True)
    unit = np.divide(exact, norms, out=np.zeros_like(exact), where=norms > 0)
    return np.clip(np.einsum("ij,ij->i", unit[index[: len(i)]], unit[index[len(i) :]]), -1.0, 1.0)


def threshold_edges(emb: np.ndarray, sim: np.ndarray, margin: float, threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """The threshold graph's edges (sim > threshold; each pair once, i < j, row by row) as cosine_similarity_matrix
    would give them: the entries of `sim` within `margin` of the threshold are decided on their float64 value. Read
    from the upper triangle alone, without n x n masks (most of the graph's cost on a 200-example neuron)."""
    n = len(sim)
    upper = upper_triangle(n)
    values = sim.reshape(-1)[upper]
    keep = values > threshold
    if margin > 0:
        near = np.flatnonzero(np.abs(values - threshold) <= margin)
        if len(near):
            i, j = np.divmod(upper[near], n)
            keep[near] = exact_similarity(emb, i, j) > threshold
    i, j = np.divmod(upper[keep], n)
    return n, i, j


@functools.lru_cache(maxsize=64)
def upper_triangle(n: int) -> np.ndarray:
    """Flat indices of an n x n matrix's entries above the diagonal, row by row (np.nonzero's order)."""
    i, j = np.triu_indices(n, 1)
    upper = i * n + j
    upper.flags.writeable = False
    return upper


def edge_list(graph: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """A symmetric boolean adjacency matrix as (nodes, i, j) with each edge once (i < j)."""
    i, j = np.nonzero(np.triu(graph, 1))
    return len(graph), i, j


def components(graphs: list[np.ndarray | tuple[int, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Connected components of many small undirected graphs (boolean adjacency matrices, or edge_list's (nodes, i,
    j)) in one call, as one block-diagonal sparse graph: per graph, its nodes' component ids (distinct across
    graphs, not renumbered; the ids of one graph's components are consecutive)."""
    lists = [edge_list(g) if isinstance(g, np.ndarray) else g for g in graphs]
    offsets = np.concatenate([[0], np.cumsum([n for n, _, _ in lists])]).astype(np.int64)
    rows = np.concatenate([i + o for (_, i, _), o in zip(lists, offsets)]) if lists else np.zeros(0, np.int64)
    cols = np.concatenate([j + o for (_, _, j), o in zip(lists, offsets)]) if lists else np.zeros(0, np.int64)
    total = int(offsets[-1])
    graph = csr_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(total, total))
    _, labels = connected_components(graph, directed=False)
    return [labels[offsets[k] : offsets[k + 1]] for k in range(len(lists))]


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
    from scipy.spatial.distance import squareform

    if len(sim) < 2:
        return np.zeros(len(sim), dtype=np.int64)
    dist = 1.0 - sim
    np.fill_diagonal(dist, 0.0)
    tree = average_linkage(squareform(dist, checks=False), len(sim))
    return _canonical_labels(clusters_at(tree, np.nextafter(1.0 - threshold, -np.inf)))


def clusters_at(tree: np.ndarray, cut: float) -> np.ndarray:
    """Each leaf's cluster under fcluster(tree, cut, criterion="distance"), as some id per cluster (not numbered
    0 .. k-1: callers renumber or count)."""
    from scipy.cluster.hierarchy import fcluster

    heights = tree[:, 2]
    if np.any(heights[1:] < heights[:-1]):  # never from scipy's average linkage (sorted); fcluster handles it
        return fcluster(tree, cut, criterion="distance")
    return merged_below(tree, int(np.searchsorted(heights, cut, side="right")))


def average_linkage(condensed: np.ndarray, n: int) -> np.ndarray:
    """scipy's linkage(condensed, method="average"): its nearest-neighbour-chain core, called directly where scipy
    has it, since the public call's array-API dispatch and checks cost 3x the clustering of a 40-example neuron
    (tests compare the two)."""
    return _linkage(condensed, n, "average", "nn_chain")


def single_linkage(condensed: np.ndarray, n: int) -> np.ndarray:
    """scipy's linkage(condensed, method="single"), its minimum-spanning-tree core called directly likewise."""
    return _linkage(condensed, n, "single", "mst_single_linkage")


def _linkage(condensed: np.ndarray, n: int, method: str, core_name: str) -> np.ndarray:
    from scipy.cluster import hierarchy

    core = getattr(getattr(hierarchy, "_hierarchy", None), core_name, None)
    code = getattr(hierarchy, "_LINKAGE_METHODS", {}).get(method)
    if core is None or code is None or not np.isfinite(condensed).all():
        return hierarchy.linkage(condensed, method=method)
    data = np.ascontiguousarray(condensed, dtype=np.float64)
    return np.asarray(core(data, n) if method == "single" else core(data, n, code))


def merged_below(tree: np.ndarray, merges: int) -> np.ndarray:
    """Each leaf's cluster after the first `merges` merges of a linkage matrix (as its root node's id): what
    fcluster(criterion="distance") gives when the merge heights are sorted, without its per-call validation
    (most of its time on a neuron's 200 examples, and metrics' stability calls it 10 times per neuron)."""
    n = len(tree) + 1
    root = list(range(n + merges))
    left, right = tree[:merges, 0].astype(np.int64).tolist(), tree[:merges, 1].astype(np.int64).tolist()
    for k in range(merges - 1, -1, -1):  # a merge's parent comes later in the matrix: its root is already known
        root[left[k]] = root[right[k]] = root[n + k]
    return np.asarray(root[:n], dtype=np.int64)


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
    emb = np.asarray(emb)
    return cluster_block(emb, [(0, len(emb))], threshold, method)[0]


def cluster_block(emb: np.ndarray, groups: list[tuple[int, int]], threshold: float, method: str,
                  norms: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """Cluster each neuron of a block of rows (its rows emb[start:stop] for each (start, stop) of `groups`; `norms`:
    the rows' row_norms, when the caller has them): the threshold graphs of all of them go through one
    connected-components call."""
    if not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"clustering.threshold: {threshold} is outside [-1, 1]")
    if method not in METHODS:
        raise PipelineError(f"clustering.method: '{method}' is not one of {', '.join(METHODS)}")
    unit = unit_rows(emb, norms) if emb.dtype == np.float32 else None
    sims = [gram(emb[start:stop], None if unit is None else unit[start:stop]) for start, stop in groups]
    if method == "threshold_graph":
        graphs = [threshold_edges(emb[start:stop], sim, margin, threshold) for (start, stop), (sim, margin) in zip(groups, sims)]
        labels = [_canonical_labels(raw) if len(raw) else raw.astype(np.int64) for raw in components(graphs)]
    else:
        labels = [cluster_labels(cosine_similarity_matrix(emb[start:stop]), threshold, method) for start, stop in groups]
    return [cluster_summary(emb[start:stop], sim, margin, neuron_labels)
            for (start, stop), (sim, margin), neuron_labels in zip(groups, sims, labels)]


def cluster_summary(emb: np.ndarray, sim: np.ndarray, margin: float, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sizes, each example's mean similarity to the rest of its cluster (1 alone), and each cluster's central
    example: the highest mean similarity; of equals, the first (the stronger example). Means within float32's
    error of the cluster's best are compared on their float64 values, so the choice is cosine_similarity_matrix's."""
    n = len(labels)
    sizes = np.bincount(labels)
    if not n:
        return {"cluster": labels, "cluster_size": sizes[labels], "is_central": np.zeros(0, bool), "mean_similarity": np.zeros(0)}
    off_diagonal = sim.astype(np.float64)
    np.fill_diagonal(off_diagonal, 0.0)
    members = np.zeros((n, len(sizes)))
    members[np.arange(n), labels] = 1.0
    peers = sizes[labels] - 1
    mean_sim = np.where(peers > 0, (off_diagonal @ members)[np.arange(n), labels] / np.maximum(peers, 1), 1.0)
    score = mean_sim.copy()
    if margin > 0:
        best = np.full(len(sizes), -np.inf)
        np.maximum.at(best, labels, mean_sim)
        close = (mean_sim >= best[labels] - 2 * margin) & (peers > 0)
        tied = np.flatnonzero(close & (np.bincount(labels[close], minlength=len(sizes)) > 1)[labels])
        if len(tied):
            pairs = [(i, others[others != i]) for i in tied.tolist() for others in [np.flatnonzero(labels == labels[i])]]
            exact = exact_similarity(emb, np.concatenate([np.full(len(o), i) for i, o in pairs]),
                                     np.concatenate([o for _, o in pairs]))
            starts = np.concatenate([[0], np.cumsum([len(o) for _, o in pairs])[:-1]])
            score[tied] = np.add.reduceat(exact, starts) / peers[tied]
    order = np.lexsort((np.arange(n), -score, labels))
    central = np.zeros(n, dtype=bool)
    central[order[np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])]] = True
    return {"cluster": labels, "cluster_size": sizes[labels], "is_central": central, "mean_similarity": mean_sim}


def neuron_groups(neuron: np.ndarray) -> list[tuple[int, int, int]]:
    """(neuron, start, stop) row ranges of a table sorted by neuron."""
    if len(neuron) == 0:
        return []
    ids, starts = np.unique(neuron, return_index=True)
    stops = np.append(starts[1:], len(neuron))
    return list(zip(ids.tolist(), starts.tolist(), stops.tolist()))


def layer_zero_neurons(norms: np.ndarray, neuron_max: dict[int, float]) -> set[int]:
    """The neurons whose embeddings are all (numerically) zero, from every row's norm and each neuron's largest
    (is_zero against zero_norm_scale, for a layer streamed neuron by neuron)."""
    nonzero = norms[norms > 0]
    scale = float(ZERO_NORM * np.median(nonzero)) if nonzero.size else 0.0
    return {neuron for neuron, largest in neuron_max.items() if largest <= scale}


def row_norms(emb: np.ndarray) -> np.ndarray:
    """Each row's norm, in float64 (as zero_norm_scale and is_zero take them; no float64 copy of the rows)."""
    return np.sqrt(np.einsum("ij,ij->i", emb, emb, dtype=np.float64)) if emb.size else np.zeros(len(emb))


def cluster_layer(embeddings_path: str | os.PathLike, out_path: str | os.PathLike, layer: int, threshold: float, method: str,
                  selection_path: str | os.PathLike | None = None,
                  weights_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Cluster every neuron of a layer, streaming the embeddings a block of neurons at a time; a neuron found all
    zero (against the whole layer's norms, known at the end) gets NO_CLUSTER. Given the layer's selection and the
    embedding weights (as the workflow gives them), the embeddings are remade from those, not read back."""
    if method not in METHODS:
        raise PipelineError(f"clustering.method: '{method}' is not one of {', '.join(METHODS)}")
    if not -1.0 <= threshold <= 1.0:
        raise PipelineError(f"clustering.threshold: {threshold} is outside [-1, 1]")
    keys: list[pa.Table] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("cluster", "cluster_size", "is_central", "mean_similarity")}
    norms: list[np.ndarray] = []
    neuron_max: dict[int, float] = {}
    spans: dict[int, tuple[int, int]] = {}
    offset = 0
    remake = remake_from(selection_path, weights_path)
    for piece, emb in embedding_blocks(embeddings_path, ["layer", "neuron", "expert", "example_rank"], remake):
        keys.append(piece)
        block_norms = row_norms(emb)
        norms.append(block_norms)
        groups = neuron_groups(piece.column("neuron").to_numpy())
        results = cluster_block(emb, [(start, stop) for _, start, stop in groups], threshold, method, block_norms)
        for (neuron, start, stop), result in zip(groups, results):
            neuron_max[neuron] = float(block_norms[start:stop].max())
            spans[neuron] = (offset + start, offset + stop)
            for key in parts:
                parts[key].append(result[key])
        offset += piece.num_rows
    dead = layer_zero_neurons(np.concatenate(norms) if norms else np.zeros(0), neuron_max)

    def joined(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(0, dtype)

    columns = {"cluster": joined("cluster", np.int32), "cluster_size": joined("cluster_size", np.int32),
               "is_central": joined("is_central", bool), "mean_similarity": joined("mean_similarity", np.float32)}
    for neuron in dead:
        rows = slice(*spans[neuron])
        columns["cluster"][rows], columns["cluster_size"][rows] = NO_CLUSTER, 0
        columns["is_central"][rows], columns["mean_similarity"][rows] = False, np.nan
    key_table = pa.concat_tables(keys) if keys else pa.table(
        {name: pa.array([], schemas.CLUSTERS.field(name).type) for name in ("layer", "neuron", "expert", "example_rank")})
    out = pa.Table.from_pydict(
        {**{name: key_table.column(name) for name in ("layer", "neuron", "expert", "example_rank")},
         **{name: pa.array(values) for name, values in columns.items()}},
        schema=schemas.CLUSTERS,
    )
    upstream = parquet_provenance(embeddings_path)
    meta = provenance("clustering", {"layer": layer, "threshold": threshold, "method": method}, model=upstream.get("model"))
    write_parquet(out, out_path, meta)
    return {"neurons": len(spans), "zero_embedding_neurons": len(dead)}
