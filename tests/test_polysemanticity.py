"""The pieces that make a polysemanticity figure trustworthy, each on a case whose answer is known by construction:
unit status, the baselines (token identity, input only, stability), the selection's rules (no examples where a
neuron does not fire, repeated contexts once), the seeded max_tokens sample, the bootstrap intervals, and every
figure on degenerate inputs (empty, one value, constant, all NaN)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from neuron_embeddings import metrics, schemas
from neuron_embeddings.clustering import cluster_labels, cosine_similarity_matrix, is_zero, zero_norm_scale
from neuron_embeddings.compare import match_layers
from neuron_embeddings.metrics import interval
from neuron_embeddings.corpus import WindowSample
from neuron_embeddings.figures import bin_edges, finite, hist
from neuron_embeddings.selection import context_ids, finalize
from neuron_embeddings.topk import NO_TOKEN


# ---------------------------------------------------------------------------------------------------------------
# adjusted Rand index and the baselines


def test_adjusted_rand_matches_scikit_learn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for n, ka, kb in ((2, 2, 1), (10, 3, 4), (40, 5, 2), (7, 7, 1), (25, 1, 1)):
        a, b = rng.integers(0, ka, n), rng.integers(0, kb, n)
        assert metrics.adjusted_rand(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    labels = np.array([0, 0, 1, 1, 2])
    assert metrics.adjusted_rand(labels, labels + 10) == 1.0  # the names of the groups do not matter
    assert metrics.adjusted_rand(np.zeros(1, int), np.zeros(1, int)) == 1.0


def test_token_identity_is_one_when_clusters_are_the_tokens():
    tokens = np.array([5, 5, 9, 9, 9, 2])
    same = metrics.token_identity(np.array([0, 0, 1, 1, 1, 2]), tokens)
    assert same == {"ari_token": 1.0, "single_token_cluster_share": 1.0}
    # one cluster over three tokens: no cluster is a single token, and the partitions disagree
    one = metrics.token_identity(np.zeros(6, int), tokens)
    assert one["single_token_cluster_share"] == 0.0 and one["ari_token"] == 0.0
    # a cluster per feature that spans tokens: two clusters, four tokens
    split = metrics.token_identity(np.array([0, 0, 1, 1]), np.array([1, 2, 3, 4]))
    assert split["single_token_cluster_share"] == 0.0 and split["ari_token"] == 0.0


def test_input_only_shows_what_the_weights_add():
    # x tells two inputs apart on dimension 1; the neuron's weight there is 0, so x * w cannot
    x = np.array([[1.0, 1.0, 0.0], [1.0, 1.1, 0.0], [1.0, -1.0, 0.0], [1.0, -1.2, 0.0]])
    w = np.array([1.0, 0.0, 0.0])
    labels = cluster_labels(cosine_similarity_matrix(x * w), 0.5, "agglomerative")
    assert labels.max() + 1 == 1
    result = metrics.input_only(x, labels, 0.5, "agglomerative")
    assert result == {"n_clusters_input": 2, "ari_input": 0.0}
    same = metrics.input_only(x, cluster_labels(cosine_similarity_matrix(x), 0.5, "agglomerative"), 0.5, "agglomerative")
    assert same["ari_input"] == 1.0


def test_stability_is_one_for_separated_clusters_and_lower_for_a_noisy_split():
    rng = np.random.default_rng(0)
    separated = np.vstack([np.eye(4)[0] + 0.01 * rng.standard_normal((10, 4)), np.eye(4)[1] + 0.01 * rng.standard_normal((10, 4))])
    sim = cosine_similarity_matrix(separated)
    labels = cluster_labels(sim, 0.5, "agglomerative")
    assert metrics.stability(sim, labels, 0.5, "agglomerative", 10, 0.8, np.random.default_rng(1)) == 1.0
    # a chain: 20 directions 9 degrees apart, linked only to their neighbours; one cluster that any subset with a
    # gap splits, so the split is unstable by construction
    angles = np.radians(np.arange(20) * 9.0)
    chain = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    sim = cosine_similarity_matrix(chain)
    threshold = float(np.cos(np.radians(12)))
    labels = cluster_labels(sim, threshold, "threshold_graph")
    assert labels.max() == 0
    noisy = metrics.stability(sim, labels, threshold, "threshold_graph", 20, 0.5, np.random.default_rng(1))
    assert noisy is not None and noisy < 0.2
    assert metrics.stability(sim, labels, 0.1, "threshold_graph", 0, 0.5, np.random.default_rng(1)) is None
    assert metrics.stability(sim[:1, :1], labels[:1], 0.1, "threshold_graph", 5, 0.8, np.random.default_rng(1)) is None


def test_zero_embeddings_are_degenerate_whatever_the_scale():
    emb = np.vstack([np.ones((3, 4)), np.zeros((2, 4)), 1e-12 * np.ones((2, 4))])
    scale = zero_norm_scale(emb)
    assert not is_zero(emb[:3], scale) and is_zero(emb[3:5], scale) and is_zero(emb[5:], scale)
    assert is_zero(np.zeros((0, 4)), scale) and zero_norm_scale(np.zeros((4, 4))) == 0.0


def test_summary_leaves_out_dead_and_few_example_units_and_says_so():
    rows = []
    for neuron, (status, size, clusters) in enumerate(
        [("live", 8, 3), ("live", 6, 1), ("dead", 0, 0), ("dead", 40, 0), ("few_examples", 2, 2)]
    ):
        rows.append({
            "layer": 0, "neuron": neuron, "expert": None, "status": status, "size": size, "duplicates": 1,
            "n_clusters": clusters, "largest_cluster_share": 1.0, "max_activation": 1.0, "min_activation": -0.5,
            "mean_activation": 0.1, "frac_positive": 0.5, "ari_token": 0.5 if status == "live" else None,
        })
    summary = metrics.summarize_layer(pa.Table.from_pylist(rows, schema=schemas.METRICS))
    assert summary["neurons"] == 5 and summary["live"] == 2
    assert summary["left_out"] == {"few_examples": 1, "dead": 2}
    assert summary["clusters_per_neuron_median"] == 2.0 and summary["frac_polysemantic"] == 0.5
    assert summary["examples_per_live_neuron"] == {"median": 7.0, "min": 6, "total": 14}
    assert summary["duplicates_dropped"] == 5 and summary["baselines"]["ari_token_median"] == 0.5
    assert summary["baselines"]["stability_median"] is None  # all null: no figure, not 0
    empty = metrics.summarize_layer(pa.Table.from_pylist([], schema=schemas.METRICS))
    assert empty["live"] == 0 and empty["clusters_per_neuron_median"] is None


# ---------------------------------------------------------------------------------------------------------------
# the selection's rules


def _state(values: list[list[float]], tokens: list[list[int]]) -> dict[str, torch.Tensor]:
    v = torch.tensor(values, dtype=torch.float32)
    t = torch.tensor(tokens, dtype=torch.int64)
    n, k = v.shape
    empty = ~torch.isfinite(v)
    return {
        "keys": torch.where(empty, -torch.inf, v.double()), "values": v, "tokens": torch.where(empty, NO_TOKEN, t),
        "xrow": torch.where(empty, -1, torch.arange(n * k).view(n, k)), "pre": torch.zeros(n, k, 1),
        "context": torch.zeros(n, k, 3), "x": torch.zeros(n * k, 2),
    }


def test_finalize_drops_entries_where_the_neuron_does_not_fire():
    state = _state([[2.0, 0.0, -1.0], [-3.0, -0.5, -np.inf]], [[0, 1, 2], [3, 4, 0]])
    out = finalize(state, "positive", None, 0, 0)
    assert torch.isfinite(out["values"]).tolist() == [[True, False, False], [False, False, False]]
    out = finalize(state, "negative", None, 0, 0)
    assert torch.isfinite(out["values"]).tolist() == [[False, False, True], [True, True, False]]
    out = finalize(state, "both", None, 0, 0)
    assert torch.isfinite(out["values"]).tolist() == [[True, False, True], [True, True, False]]
    assert out["xrow"][0, 1] == -1 and out["tokens"][0, 1] == NO_TOKEN


def test_finalize_counts_repeated_contexts_once_keeping_the_strongest():
    # windows of 4 tokens: windows 0 and 1 are the same text, window 2 differs in its last token
    windows = np.array([[7, 8, 9, 10], [7, 8, 9, 10], [7, 8, 9, 11]])
    # neuron 0: token 1 (window 0, pos 1) and token 5 (window 1, pos 1) have the same context; token 9 (window 2)
    # differs within context_after=2 of pos 1. Neuron 1 sees token 5 alone: it keeps it.
    state = _state([[1.0, 3.0, 2.0], [1.5, -np.inf, -np.inf]], [[1, 5, 9], [5, 0, 0]])
    out = finalize(state, "positive", windows, 1, 2)
    assert out["duplicates"].tolist() == [1, 0]
    assert torch.isfinite(out["values"]).tolist() == [[False, True, True], [True, False, False]]  # the 3.0 copy kept
    # a narrower context no longer sees the differing token: all three are one context
    narrow = finalize(state, "positive", windows, 1, 1)
    assert narrow["duplicates"].tolist() == [2, 0]


def test_context_ids_stop_at_the_window_edges():
    windows = np.array([[1, 2, 3, -1], [4, 5, 6, 7]])
    got = context_ids(np.array([0, 5, 7]), windows, 1, 1)
    assert got.tolist() == [[-1, 1, 2], [4, 5, 6], [6, 7, -1]]


# ---------------------------------------------------------------------------------------------------------------
# the corpus sample


def _offer_all(sample: WindowSample, n: int, size: int = 4) -> list[int]:
    for i in range(n):
        sample.offer({"id": i, "input_ids": [0] * size})
    return [w["id"] for w in sample.windows()]


def test_window_sample_is_seeded_spread_and_within_budget():
    kept = _offer_all(WindowSample(40, seed=0), 100)
    assert len(kept) == 10 and kept == sorted(kept)  # 40 tokens of 4-token windows, in corpus order
    assert kept == _offer_all(WindowSample(40, seed=0), 100)
    assert kept != _offer_all(WindowSample(40, seed=1), 100)
    assert max(kept) > 50  # not the first windows in order
    assert _offer_all(WindowSample(None, seed=0), 7) == list(range(7))
    # each window's chance is the same wherever it sits: over many seeds, the first and second halves tie
    firsts = sum(sum(1 for i in _offer_all(WindowSample(40, seed=s), 100) if i < 50) for s in range(200))
    assert 0.45 < firsts / 2000 < 0.55


def test_window_sample_of_uneven_windows_stops_at_the_first_that_reaches_the_budget():
    sample = WindowSample(10, seed=3)
    for i, size in enumerate([6, 1, 7, 3, 2, 5, 4]):
        sample.offer({"id": i, "input_ids": [0] * size})
    total = sum(len(w["input_ids"]) for w in sample.windows())
    assert 10 <= total < 10 + 7  # reaches the budget, passing it by less than one window


# ---------------------------------------------------------------------------------------------------------------
# comparison


def test_bootstrap_interval_holds_the_value_and_copes_with_little_data():
    values = np.array([1, 1, 2, 2, 3, 3, 4, 5, 8, 9], float)
    got = interval(values, np.median, 500, 0)
    assert got["low"] <= got["value"] == 3.0 <= got["high"]
    assert interval(values, np.median, 500, 0) == got  # seeded
    assert interval(np.array([]), np.median, 100, 0) == {"value": None, "low": None, "high": None}
    assert interval(np.array([4.0]), np.median, 100, 0) == {"value": 4.0, "low": 4.0, "high": 4.0}
    assert interval(np.full(5, 2.0), np.median, 100, 0) == {"value": 2.0, "low": 2.0, "high": 2.0}
    assert interval(np.array([np.nan, np.nan]), np.median, 100, 0)["value"] is None


def test_layers_match_by_index_or_by_relative_depth():
    same = {"a": {"n_layers": 12, "layers": [0, 6, 11]}, "b": {"n_layers": 12, "layers": [0, 6, 11]}}
    how, rows = match_layers(same)
    assert how == "layer index" and [r["layers"] for r in rows] == [{"a": 0, "b": 0}, {"a": 6, "b": 6}, {"a": 11, "b": 11}]
    deeper = {"a": {"n_layers": 12, "layers": [0, 11]}, "b": {"n_layers": 24, "layers": [0, 12, 23]}}
    how, rows = match_layers(deeper)
    assert how == "relative depth" and [r["layers"]["b"] for r in rows] == [0, 23]


# ---------------------------------------------------------------------------------------------------------------
# figures on degenerate inputs


DEGENERATE = {
    "empty": [],
    "single": [3.0],
    "constant": [2.0] * 7,
    "all_nan": [float("nan")] * 4,
    "none": [None, None],
    "with_inf": [1.0, float("inf"), 2.0],
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_hist_draws_or_notes_any_input(case):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    drawn = hist(ax, DEGENERATE[case], 30)
    assert drawn == finite(DEGENERATE[case]).size
    drawn_int = hist(ax, DEGENERATE[case], integer=True)
    assert drawn_int == drawn
    if not drawn:
        assert any("no data" in t.get_text() for t in ax.texts)
    plt.close(fig)
    edges = bin_edges(finite(DEGENERATE[case]), 30)
    assert np.all(np.diff(edges) > 0)


def _metrics_table(case: str) -> pa.Table:
    values = DEGENERATE[case]
    rows = [{
        "layer": 0, "neuron": i, "expert": None, "status": "live", "size": 3, "duplicates": 0,
        "n_clusters": 1 if v is None or not np.isfinite(v) else int(min(v, 50)), "largest_cluster_share": 1.0,
        "mean_distance": v, "ari_token": v, "max_activation": 1.0, "min_activation": 0.0, "mean_activation": 0.0,
        "frac_positive": 1.0,
    } for i, v in enumerate(values)]
    return pa.Table.from_pylist(rows, schema=schemas.METRICS)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_report_and_comparison_figures_on_degenerate_layers(case):
    import base64

    from neuron_embeddings.compare import figure
    from neuron_embeddings.report import layer_figure

    assert base64.b64decode(layer_figure(_metrics_table(case), 0))[:4] == b"\x89PNG"
    values = [v for v in DEGENERATE[case] if v is not None and np.isfinite(v)]
    rows = [{"position": "layer 0", "models": {"a": {"clusters": values, "frac_polysemantic": interval(np.array(values, float), np.median, 50, 0)}}}]
    assert len(figure(rows, ["a", "b"])) > 100


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_layer_plot_on_degenerate_layers(case, tmp_path):
    from neuron_embeddings.storage import write_parquet
    from neuron_embeddings.sweep import plot_layer

    write_parquet(_metrics_table(case), tmp_path / "m.parquet", {})
    write_parquet(pa.Table.from_pylist([], schema=schemas.SWEEP), tmp_path / "s.parquet", {})
    write_parquet(pa.Table.from_pylist([], schema=schemas.SIMILAR), tmp_path / "x.parquet", {})
    plot_layer(tmp_path / "m.parquet", tmp_path / "s.parquet", tmp_path / "x.parquet", tmp_path / "out.png", 0)
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"



# ---------------------------------------------------------------------------------------------------------------
# the run's models


def test_models_take_the_runs_layers_at_the_same_relative_depth(tmp_path):
    import json

    from neuron_embeddings.checks import model_entries
    from neuron_embeddings.errors import PipelineError

    for name, depth in (("shallow", 12), ("deep", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": "gpt2", "n_layer": depth, "architectures": ["GPT2LMHeadModel"]}))
    config = {"run": "r", "layers": [11, 0, 6], "models": [
        {"name": "shallow", "source": str(tmp_path / "shallow")},
        {"name": "deep", "source": str(tmp_path / "deep")},
        {"name": "chosen", "source": str(tmp_path / "deep"), "layers": [5, 3]},
        {"name": "control", "source": str(tmp_path / "shallow"), "random_init": {"seed": 0}},
    ]}
    got = {e["name"]: e["layers"] for e in model_entries(config)}
    assert got == {"shallow": [0, 6, 11], "deep": [0, 13, 23], "chosen": [3, 5], "control": [0, 6, 11]}
    single = model_entries({"run": "r", "layers": [2], "model": {"source": "builtin:smollm2-135m-instruct"}})
    assert [(e["name"], e["layers"]) for e in single] == [("smollm2-135m-instruct", [2])]
    config["models"][2]["name"] = "deep"
    with pytest.raises(PipelineError, match="models: the name 'deep' is used twice"):
        model_entries(config)
