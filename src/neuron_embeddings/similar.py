"""Similar features across neurons: for each feature cluster, the clusters of other neurons that share it.

A cluster is represented by its central example's MLP input x at the max token (the paper's choice: x is what
every neuron of the layer reads, so the same x means the same input, whichever neuron fires on it). Over all
clusters of all neurons of a layer, an exact nearest-neighbour search by cosine similarity keeps, per cluster,
the `top_k` most similar clusters of *other* neurons above `min_similarity`.

Examples that sit on the same token have the same x (the selection stores one x per token), so the search runs
over distinct x only and expands the hits to their clusters; ties are broken by (neuron, cluster), so the
result is deterministic. Backends: faiss's exact inner-product index (the default: measured fastest here) or
scikit-learn's brute-force NearestNeighbors; both give the same table.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from . import schemas
from .errors import PipelineError
from .storage import load_tensors, parquet_provenance, provenance, read_parquet, write_parquet
from .tables import store_rows

BACKENDS = ("faiss", "sklearn")


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def nearest(unit: np.ndarray, k: int, backend: str, threads: int = 1) -> np.ndarray:
    """Indices of each row's k nearest rows by cosine (itself included), exact."""
    k = min(k, len(unit))
    if backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(unit.shape[1])
        index.add(unit)
        return index.search(unit, k)[1]
    if backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        model = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=threads).fit(unit)
        return model.kneighbors(unit, return_distance=False)
    raise PipelineError(f"analyses.similar.backend: '{backend}' is not one of {', '.join(BACKENDS)}")


def link_clusters(
    rows: np.ndarray,
    store: np.ndarray,
    neuron: np.ndarray,
    cluster: np.ndarray,
    top_k: int = 20,
    min_similarity: float = 0.5,
    backend: str = "faiss",
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """Per cluster (its central example's x is store[rows[i]]), the top_k most similar clusters of other neurons.

    Returns flat arrays (neuron, cluster, rank, other_neuron, other_cluster, similarity), ordered by neuron,
    cluster and rank; similarities in float64, recomputed from the unit vectors so every backend agrees. A
    cluster whose x is zero (cosine undefined) gets no links and appears in none.
    """
    neuron, cluster = np.asarray(neuron, np.int64), np.asarray(cluster, np.int64)
    distinct, group = np.unique(rows, return_inverse=True)
    unit = unit_rows(store[distinct])
    # Enough distinct neighbours that, after dropping the query's own neuron, top_k clusters remain.
    most_clusters = int(np.bincount(neuron).max(initial=0))
    hits = nearest(unit, top_k + most_clusters + 1, backend, threads) if len(unit) else np.zeros((0, 0), np.int64)
    members: list[list[int]] = [[] for _ in range(len(distinct))]
    for i, g in enumerate(group.tolist()):
        members[g].append(i)
    found: list[tuple[int, int, int, int, int, float]] = []
    usable = np.linalg.norm(unit, axis=1) > 0  # a zero x has no direction: it neither links nor is linked
    for g, hit in enumerate(hits):
        if not usable[g]:
            continue
        hit = hit[(hit >= 0) & usable[np.maximum(hit, 0)]]
        sims = unit[hit].astype(np.float64) @ unit[g].astype(np.float64)
        candidates = [(-s, int(neuron[j]), int(cluster[j])) for h, s in zip(hit.tolist(), sims.tolist()) if s >= min_similarity for j in members[h]]
        candidates.sort()
        for i in members[g]:
            picked = [c for c in candidates if c[1] != neuron[i]][:top_k]
            found.extend((int(neuron[i]), int(cluster[i]), r, n, c, -s) for r, (s, n, c) in enumerate(picked))
    found.sort()
    names = ("neuron", "cluster", "rank", "other_neuron", "other_cluster", "similarity")
    return {name: np.array([f[k] for f in found], np.float64 if name == "similarity" else np.int64) for k, name in enumerate(names)}


def similar_features(
    selection_path: str | os.PathLike,
    clusters_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
    top_k: int = 20,
    min_similarity: float = 0.5,
    backend: str = "faiss",
    threads: int = 1,
) -> dict[str, Any]:
    clusters = read_parquet(clusters_path, schemas.CLUSTERS)
    rows, store = store_rows(selection_path)
    if len(rows) != clusters.num_rows:
        raise PipelineError(f"{clusters_path}: {clusters.num_rows} rows, the selection has {len(rows)} examples")
    central = np.flatnonzero(clusters.column("is_central").to_numpy(zero_copy_only=False))
    start = time.perf_counter()
    links = link_clusters(
        rows[central], store, clusters.column("neuron").to_numpy()[central], clusters.column("cluster").to_numpy()[central],
        top_k, min_similarity, backend, threads,
    )
    seconds = time.perf_counter() - start
    table = pa.Table.from_pydict(
        {"layer": pa.array(np.full(len(links["neuron"]), layer), pa.int16()), **links}, schema=schemas.SIMILAR
    )
    meta = provenance(
        "similar",
        {"layer": layer, "top_k": top_k, "min_similarity": min_similarity, "backend": backend},
        clustering=parquet_provenance(clusters_path).get("settings"),
    )
    write_parquet(table, out_path, meta)
    return {
        "clusters": len(central),
        "distinct_inputs": len(np.unique(rows[central])),
        "links": table.num_rows,
        "seconds": round(seconds, 3),
        "backend": backend,
    }
