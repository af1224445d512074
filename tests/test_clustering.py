"""Per-neuron clustering of embeddings, and the metrics computed from the clusters, on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuron_embeddings import clustering, metrics
from neuron_embeddings.checks import threshold_for
from neuron_embeddings.errors import PipelineError


def _groups(sizes_in_order: list[int], order: list[int], dim: int = 6, noise: float = 0.05, seed: int = 0):
    """Rows near orthogonal directions: row i belongs to group order[i]; returns (emb, group of each row)."""
    rng = np.random.default_rng(seed)
    group = np.array(order)
    assert np.bincount(group).tolist() == sizes_in_order
    emb = np.eye(dim)[group] * rng.uniform(0.5, 3.0, size=(len(group), 1))  # norms differ: cosine ignores them
    emb = emb + noise * rng.standard_normal(emb.shape)
    return emb.astype(np.float32), group


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :]))


def test_three_orthogonal_groups():
    # group 0 has 2 rows, group 1 has 5, group 2 has 3, interleaved; the largest must be labelled 0
    order = [0, 1, 2, 1, 1, 2, 0, 1, 2, 1]
    emb, group = _groups([2, 5, 3], order)
    out = clustering.cluster_neuron(emb, threshold=0.5)
    labels = out["cluster"]
    assert _same_partition(labels, group)
    expected = np.array([{1: 0, 2: 1, 0: 2}[g] for g in group])  # by size: 5 -> 0, 3 -> 1, 2 -> 2
    assert labels.tolist() == expected.tolist()
    assert out["cluster_size"].tolist() == [{0: 5, 1: 3, 2: 2}[c] for c in expected]
    assert out["is_central"].sum() == 3
    for c in range(3):
        assert out["is_central"][labels == c].sum() == 1
    assert (out["mean_similarity"] > 0.9).all()  # tight groups


def test_chain_is_one_component_not_a_clique():
    # a~b and b~c above the threshold, a and c orthogonal: connected components join all three
    a, b, c = [1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]
    far = [-1.0, -0.2]
    emb = np.array([a, b, c, far])
    sim = clustering.cosine_similarity_matrix(emb)
    assert sim[0, 1] > 0.6 and sim[1, 2] > 0.6 and abs(sim[0, 2]) < 1e-12
    out = clustering.cluster_neuron(emb, threshold=0.6)
    assert out["cluster"].tolist() == [0, 0, 0, 1]
    assert out["cluster_size"].tolist() == [3, 3, 3, 1]
    # b is the most similar to the rest of its cluster
    assert out["is_central"].tolist() == [False, True, False, True]
    np.testing.assert_allclose(out["mean_similarity"][:3], [math.sqrt(0.5) / 2, math.sqrt(0.5), math.sqrt(0.5) / 2])
    assert out["mean_similarity"][3] == 1.0


def test_threshold_is_strict():
    emb = np.array([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    sim = clustering.cosine_similarity_matrix(emb)[0, 1]
    assert clustering.cluster_neuron(emb, threshold=sim - 1e-9)["cluster"].tolist() == [0, 0]
    assert clustering.cluster_neuron(emb, threshold=min(sim + 1e-9, 1.0))["cluster"].tolist() == [0, 1]


def test_singletons():
    emb = np.eye(5)[[3, 1, 4, 0, 2]] * np.arange(1, 6)[:, None]
    out = clustering.cluster_neuron(emb, threshold=0.1)
    assert out["cluster"].tolist() == [0, 1, 2, 3, 4]  # equal sizes: numbered by first (strongest) example
    assert out["cluster_size"].tolist() == [1] * 5
    assert out["is_central"].all()
    assert out["mean_similarity"].tolist() == [1.0] * 5


def test_single_example():
    out = clustering.cluster_neuron(np.array([[0.3, -1.0, 2.0]]), threshold=0.5)
    assert out["cluster"].tolist() == [0]
    assert out["cluster_size"].tolist() == [1]
    assert out["is_central"].tolist() == [True]
    assert out["mean_similarity"].tolist() == [1.0]


def test_threshold_one_makes_singletons_even_for_identical_rows():
    emb = np.ones((3, 4))
    assert clustering.cluster_neuron(emb, threshold=1.0)["cluster"].tolist() == [0, 1, 2]
    assert clustering.cluster_neuron(emb, threshold=0.99)["cluster"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("threshold", [1.0001, -1.5, 2.0, float("nan")])
@pytest.mark.parametrize("method", ["threshold_graph", "agglomerative"])
def test_threshold_outside_range_raises(threshold, method):
    emb, _ = _groups([2, 2], [0, 1, 0, 1])
    with pytest.raises(PipelineError, match="threshold"):
        clustering.cluster_neuron(emb, threshold=threshold, method=method)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_threshold_bounds_are_allowed(threshold):
    emb, _ = _groups([2, 2], [0, 1, 0, 1])
    out = clustering.cluster_neuron(emb, threshold=threshold)
    assert len(out["cluster"]) == 4


def test_central_example_has_highest_mean_similarity():
    # one cluster of unit vectors at these angles (degrees); the 20 degree one is the most central
    angles = np.radians([0.0, 5.0, 20.0, 30.0, 9.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[3.0], [1.0], [0.5], [2.0], [1.0]])
    out = clustering.cluster_neuron(emb, threshold=0.5)
    assert out["cluster"].tolist() == [0] * 5
    diff = angles[:, None] - angles[None, :]
    expected_mean = (np.cos(diff).sum(1) - 1.0) / 4
    np.testing.assert_allclose(out["mean_similarity"], expected_mean, rtol=1e-12)
    assert int(np.argmax(expected_mean)) == 4  # 9 degrees: closest to the others on average
    assert out["is_central"].tolist() == [False, False, False, False, True]


def test_central_ties_go_to_the_stronger_example():
    # two identical rows in one cluster: same mean similarity, the first (higher rank) is central
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0]])
    out = clustering.cluster_neuron(emb, threshold=0.5)
    assert out["cluster"].tolist() == [0, 1, 1, 0]  # equal sizes: the cluster of row 0 is 0
    assert out["is_central"].tolist() == [True, True, False, False]


def test_labels_are_deterministic_and_canonical():
    order = [2, 2, 0, 1, 0, 1, 2, 1, 0, 0]  # sizes 4, 3, 3
    emb, group = _groups([4, 3, 3], order, seed=4)
    first = clustering.cluster_neuron(emb, threshold=0.5)
    second = clustering.cluster_neuron(emb.copy(), threshold=0.5)
    for key in first:
        assert np.array_equal(first[key], second[key])
    # group 0 is the largest -> 0; groups 2 and 1 tie at 3 and group 2 holds the first row -> 1
    assert first["cluster"].tolist() == [{0: 0, 2: 1, 1: 2}[g] for g in group]
    # only the grouping matters, not the raw ids a component search happens to produce
    labels = clustering._canonical_labels(np.array([7, 7, 3, 5, 3, 5, 7, 5, 3, 3]))
    assert labels.tolist() == first["cluster"].tolist()


@pytest.mark.parametrize("seed", range(3))
def test_agglomerative_agrees_on_well_separated_data(seed):
    order = [1, 0, 2, 2, 1, 3, 1, 0, 2, 1, 3, 2, 1]
    emb, group = _groups([2, 5, 4, 2], order, dim=8, seed=seed)
    graph = clustering.cluster_neuron(emb, threshold=0.5, method="threshold_graph")
    agglo = clustering.cluster_neuron(emb, threshold=0.5, method="agglomerative")
    assert _same_partition(graph["cluster"], group)
    for key in graph:
        assert np.array_equal(graph[key], agglo[key]), key


def _fcluster_labels(sim, threshold):
    """The clusters as scipy's fcluster cuts the average-linkage tree (the definition agglomerative keeps)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    dist = 1.0 - sim
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    return fcluster(tree, np.nextafter(1.0 - threshold, -np.inf), criterion="distance")


@pytest.mark.parametrize("seed", range(6))
def test_agglomerative_cut_equals_fcluster(seed):
    rng = np.random.default_rng(seed)
    for trial in range(40):
        n, dim = int(rng.integers(2, 60)), int(rng.integers(2, 12))
        emb = rng.standard_normal((n, dim))
        if trial % 3 == 0:  # repeated rows (zero distances) and coarse values (equal heights, ties at the cut)
            emb = np.round(emb[rng.integers(0, max(n // 2, 1), n)])
        sim = clustering.cosine_similarity_matrix(emb)
        heights = [0.0, 0.5, 1.0] + rng.uniform(-1, 1, 3).tolist()
        for threshold in heights:
            ours = clustering.agglomerative(sim, threshold)
            assert _same_partition(ours, _fcluster_labels(sim, threshold)), (seed, trial, threshold)
            assert np.array_equal(ours, clustering._canonical_labels(_fcluster_labels(sim, threshold) - 1))


def test_agglomerative_single_example():
    out = clustering.cluster_neuron(np.array([[1.0, 2.0]]), threshold=0.3, method="agglomerative")
    assert out["cluster"].tolist() == [0] and out["is_central"].tolist() == [True]


def test_cosine_similarity_matrix():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [-3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    sim = clustering.cosine_similarity_matrix(emb)
    assert sim.shape == (5, 5)
    assert np.isfinite(sim).all()  # a zero vector gives 0, not NaN
    np.testing.assert_allclose(sim[0, 1], 1.0)
    np.testing.assert_allclose(sim[0, 2], -1.0)
    assert sim[3].tolist() == [0.0] * 5
    np.testing.assert_allclose(sim[0, 4], math.sqrt(0.5))
    assert np.array_equal(sim, sim.T)


def test_neuron_groups_and_threshold_for():
    assert clustering.neuron_groups(np.array([], dtype=np.int64)) == []
    assert clustering.neuron_groups(np.array([0, 0, 3, 3, 3, 5])) == [(0, 0, 2), (3, 2, 5), (5, 5, 6)]
    assert threshold_for(2, 0.4) == 0.4
    cfg = {"default": 0.5, "per_layer": {"1": 0.7, 3: 0.2}}
    assert threshold_for(0, cfg) == 0.5
    assert threshold_for(1, cfg) == 0.7
    assert threshold_for(3, cfg) == 0.2


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_neuron_metrics_two_identical_pairs_of_orthogonal_vectors():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    labels = clustering.cluster_neuron(emb, threshold=0.5)["cluster"]
    assert labels.tolist() == [0, 0, 1, 1]
    m = metrics.neuron_metrics(emb, labels)
    assert m["size"] == 4
    assert m["n_clusters"] == 2
    assert m["largest_cluster_share"] == 0.5
    # 6 pairs: 2 within clusters at distance 0, 4 across at distance 1
    assert m["mean_distance"] == pytest.approx(4 / 6, abs=1e-12)
    assert m["max_distance"] == pytest.approx(1.0, abs=1e-12)
    assert m["mean_intra_distance"] == pytest.approx(0.0, abs=1e-12)
    assert m["mean_inter_distance"] == pytest.approx(1.0, abs=1e-12)


def test_neuron_metrics_by_hand():
    # 60 degrees apart, one pair opposite: distances 1 - cos
    emb = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)], [-1.0, 0.0]])
    labels = np.array([0, 0, 1])
    m = metrics.neuron_metrics(emb, labels)
    d01, d02, d12 = 0.5, 2.0, 1.5
    assert m["mean_distance"] == pytest.approx((d01 + d02 + d12) / 3)
    assert m["max_distance"] == pytest.approx(2.0)
    assert m["mean_intra_distance"] == pytest.approx(d01)
    assert m["mean_inter_distance"] == pytest.approx((d02 + d12) / 2)
    assert m["largest_cluster_share"] == pytest.approx(2 / 3)
    assert m["n_clusters"] == 2


def test_neuron_metrics_undefined_values_are_none():
    one = metrics.neuron_metrics(np.array([[1.0, 2.0]]), np.array([0]))
    assert one == {
        "size": 1, "n_clusters": 1, "largest_cluster_share": 1.0, "mean_distance": None, "max_distance": None,
        "mean_intra_distance": None, "mean_inter_distance": None,
    }
    single_cluster = metrics.neuron_metrics(np.array([[1.0, 0.0], [1.0, 0.1]]), np.array([0, 0]))
    assert single_cluster["mean_inter_distance"] is None
    assert single_cluster["mean_intra_distance"] == pytest.approx(single_cluster["mean_distance"])
    all_alone = metrics.neuron_metrics(np.eye(3), np.array([0, 1, 2]))
    assert all_alone["mean_intra_distance"] is None
    assert all_alone["mean_inter_distance"] == pytest.approx(1.0)
    assert all_alone["n_clusters"] == 3


def _adjacency(emb, sim, margin, threshold):
    """The threshold graph as a full boolean matrix, near-threshold entries decided in float64 (the definition
    threshold_edges keeps)."""
    edges = sim > threshold
    i, j = np.nonzero(np.abs(sim - threshold) <= margin)
    upper = i < j
    i, j = i[upper], j[upper]
    if len(i):
        edges[i, j] = edges[j, i] = clustering.exact_similarity(emb, i, j) > threshold
    np.fill_diagonal(edges, False)
    return edges


@pytest.mark.parametrize("n", [0, 1, 2, 37, 200])
def test_threshold_edges_are_the_adjacency_matrix_edges(n):
    """The upper-triangle edge list equals the edges of the full adjacency matrix, in order, including the pairs
    float32 puts within its error of the threshold (planted: rows that are exact mixtures at the threshold)."""
    rng = np.random.default_rng(n)
    emb = rng.standard_normal((n, 24)).astype(np.float32)
    if n >= 4:  # pairs with cosine 0.5 exactly, so their float32 similarity straddles the threshold
        base, other = emb[0] / np.linalg.norm(emb[0]), rng.standard_normal(24)
        other -= other @ base * base
        emb[1] = (0.5 * base + np.sqrt(0.75) * other / np.linalg.norm(other)).astype(np.float32)
        emb[2] = emb[0] * 3
    sim, margin = clustering.gram(emb)
    assert margin > 0
    for threshold in (0.5, 0.0, 0.1, -0.2, 0.95):
        nodes, i, j = clustering.threshold_edges(emb, sim, margin, threshold)
        ref_nodes, ref_i, ref_j = clustering.edge_list(_adjacency(emb, sim, margin, threshold))
        assert nodes == ref_nodes == n
        assert i.tolist() == ref_i.tolist() and j.tolist() == ref_j.tolist()


@pytest.mark.parametrize("method", ["threshold_graph", "agglomerative"])
def test_sweep_counts_are_the_clusterings_counts(method):
    """The sweep's one tree per neuron gives, at every threshold, the cluster count of clustering that neuron at
    that threshold (cluster_labels on the float64 similarities), near-threshold float32 entries included."""
    from neuron_embeddings.sweep import cluster_counts

    rng = np.random.default_rng(7)
    thresholds = [-0.1, 0.0, 0.05, 0.2, 0.5, 0.9]
    for trial in range(25):
        n = int(rng.integers(1, 70))
        emb = rng.standard_normal((n, 16)).astype(np.float32)
        if trial % 2 and n >= 3:  # repeated rows and an exact cosine of 0.5
            emb[1] = emb[0] * 2
            base, other = emb[0] / np.linalg.norm(emb[0]), rng.standard_normal(16)
            other -= other @ base * base
            emb[2] = (0.5 * base + np.sqrt(0.75) * other / np.linalg.norm(other)).astype(np.float32)
        sim = clustering.cosine_similarity_matrix(emb)
        expected = [int(clustering.cluster_labels(sim, t, method).max()) + 1 if n else 0 for t in thresholds]
        assert cluster_counts(emb, thresholds, method) == expected, (trial, n)
