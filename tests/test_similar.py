"""Similar features across neurons: the exact search against a brute force, backends, ties, the threshold."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_embeddings.similar import link_clusters, nearest, unit_rows


def brute_force(rows, store, neuron, cluster, top_k, min_similarity):
    # Similarity between store rows, then indexed: clusters on the same token get bit-identical similarities. A
    # matrix product over the clusters themselves may differ in the last bit between two copies of one vector
    # (BLAS blocking), which would turn an exact tie, broken by (neuron, cluster), into an arbitrary order.
    unit = unit_rows(store).astype(np.float64)
    sim = (unit @ unit.T)[np.ix_(rows, rows)]
    zero = np.linalg.norm(store[rows], axis=1) == 0
    out = []
    for i in range(len(rows)):
        others = [(-sim[i, j], int(neuron[j]), int(cluster[j])) for j in range(len(rows))
                  if neuron[j] != neuron[i] and sim[i, j] >= min_similarity and not zero[i] and not zero[j]]
        out.extend((int(neuron[i]), int(cluster[i]), r, n, c, -s) for r, (s, n, c) in enumerate(sorted(others)[:top_k]))
    return sorted(out)


def planted(seed: int = 0, n_neurons: int = 40, d: int = 24):
    """Clusters of many neurons over a store of x where some tokens (rows) are shared by several neurons."""
    rng = np.random.default_rng(seed)
    store = rng.normal(size=(150, d)).astype(np.float32)
    store[1::7] = store[0::7][: len(store[1::7])] + 0.05 * rng.normal(size=(len(store[1::7]), d))  # near duplicates
    store[5] = 0.0  # a zero vector must not break the search
    neuron, cluster, rows = [], [], []
    for n in range(n_neurons):
        for c in range(int(rng.integers(1, 6))):
            neuron.append(n)
            cluster.append(c)
            rows.append(int(rng.integers(0, 60)))  # 60 of 150 rows: many clusters share a token's x exactly
    return np.array(rows), store, np.array(neuron), np.array(cluster)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
@pytest.mark.parametrize("top_k,min_similarity", [(5, 0.0), (20, 0.3), (3, -1.0)])
def test_links_equal_brute_force(backend, top_k, min_similarity):
    rows, store, neuron, cluster = planted()
    links = link_clusters(rows, store, neuron, cluster, top_k, min_similarity, backend)
    got = sorted(zip(*(links[k].tolist() for k in ("neuron", "cluster", "rank", "other_neuron", "other_cluster", "similarity"))))
    want = brute_force(rows, store, neuron, cluster, top_k, min_similarity)
    assert [g[:5] for g in got] == [w[:5] for w in want]
    assert np.allclose([g[5] for g in got], [w[5] for w in want], atol=1e-6)


def test_backends_agree_and_results_are_deterministic():
    rows, store, neuron, cluster = planted(seed=3)
    a = link_clusters(rows, store, neuron, cluster, 20, 0.2, "faiss")
    b = link_clusters(rows, store, neuron, cluster, 20, 0.2, "sklearn")
    c = link_clusters(rows, store, neuron, cluster, 20, 0.2, "faiss")
    for key in a:
        assert np.array_equal(a[key], b[key]) if key != "similarity" else np.allclose(a[key], b[key], atol=1e-6)
        assert np.array_equal(a[key], c[key])


def test_shared_token_links_first_and_own_neuron_never():
    rows, store, neuron, cluster = planted(seed=1)
    links = link_clusters(rows, store, neuron, cluster, 20, 0.5, "faiss")
    assert not np.any(links["neuron"] == links["other_neuron"])
    assert np.all(links["similarity"] >= 0.5)
    # Two clusters of different neurons on the same token have identical x: they link with similarity 1, first.
    key = {(n, c): r for n, c, r in zip(neuron.tolist(), cluster.tolist(), rows.tolist())}
    for n, c, rank, on, oc, s in zip(*(links[k].tolist() for k in ("neuron", "cluster", "rank", "other_neuron", "other_cluster", "similarity"))):
        if key[(on, oc)] == key[(n, c)] and np.linalg.norm(store[key[(n, c)]]) > 0:
            assert s == pytest.approx(1.0)
    # ranks run 0..m-1 per cluster, similarities non-increasing
    for n, c in set(zip(links["neuron"].tolist(), links["cluster"].tolist())):
        mine = (links["neuron"] == n) & (links["cluster"] == c)
        assert links["rank"][mine].tolist() == list(range(mine.sum()))
        assert np.all(np.diff(links["similarity"][mine]) <= 1e-12)


def test_nearest_includes_itself_and_rejects_unknown_backend():
    unit = unit_rows(np.random.default_rng(0).normal(size=(30, 8)))
    assert np.array_equal(nearest(unit, 1, "faiss")[:, 0], np.arange(30))
    with pytest.raises(Exception, match="backend"):
        nearest(unit, 3, "annoy")
