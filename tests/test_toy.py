"""Toy models with known features: the ground truth, the probing with the pipeline's code, and the scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuron_embeddings.storage import read_parquet
from neuron_embeddings.toy import (
    TOY_SCORES,
    ProbeSettings,
    ToySettings,
    example_pool,
    run_toy,
    score_neurons,
    select_examples,
    summarize_toys,
    train_toy,
    true_features,
)

# By construction: neuron 0 reads only feature 0; neuron 1 reads features 1 and 2 equally; neuron 2 reads feature 3
# and, weakly (a tenth of its main weight, below truth_share), feature 0; neuron 3 reads nothing.
HAND_W = np.array(
    [
        [1.0, 0.0, 0.0, 0.0, -0.5],
        [0.0, 0.8, 0.8, 0.0, -0.5],
        [0.1, 0.0, 0.0, 1.2, 0.0],
        [-1.0, -1.0, -1.0, -1.0, -1.0],
    ],
    dtype=np.float32,
)
HAND = {"W_in": HAND_W, "E": np.eye(5, dtype=np.float32), "W": HAND_W}


def test_truth_is_read_from_the_weights():
    truth = true_features(HAND_W, share=0.3)
    assert [t.tolist() for t in truth] == [[0], [1, 2], [3], []]


@pytest.mark.parametrize("method", ["threshold_graph", "agglomerative"])
def test_scoring_recovers_a_hand_built_model_exactly(method):
    """Single-feature examples: a neuron's examples of different features have orthogonal embeddings, so the
    clustering must give exactly its true features (ARI 1, no error in features per neuron)."""
    probe = ProbeSettings(single_per_feature=30, multi=0, alpha=0.3, cap=200, truth_share=0.3)
    entries = select_examples(HAND, example_pool(5, probe), probe)
    assert set(entries["neuron"].tolist()) == {0, 1, 2}  # neuron 3 never fires: no examples
    assert np.all(entries["value"] > 0)
    # the embeddings are the pipeline's: x * W[j], summing to the pre-activation
    assert np.allclose(entries["embedding"].sum(1), entries["pre"][:, 0], atol=1e-5)
    rows = score_neurons(HAND_W, entries, true_features(HAND_W, 0.3), [0.3, 0.5, 0.8], [method])
    by_neuron = {}
    for row in rows:
        by_neuron.setdefault(row["neuron"], []).append(row)
    for neuron, n_true in ((0, 1), (1, 2), (2, 1)):
        for row in by_neuron[neuron]:
            assert row["n_true"] == n_true and row["n_clusters"] == n_true, row
            assert row["ari"] == pytest.approx(1.0)
    assert all(row["size"] == 0 and row["ari"] is None for row in by_neuron[3])


def test_mixed_examples_are_labelled_by_their_dominant_feature():
    """Two-feature inputs for neuron 1: the true feature of each is the one adding most to the pre-activation;
    average linkage keeps recovering it where the single-link threshold graph merges through mixed examples."""
    probe = ProbeSettings(single_per_feature=30, multi=300, multi_features=2, alpha=0.3, cap=400, seed=1)
    entries = select_examples(HAND, example_pool(5, probe), probe)
    rows = score_neurons(HAND_W, entries, true_features(HAND_W, 0.3), [0.5], ["agglomerative", "threshold_graph"])
    neuron1 = {r["method"]: r for r in rows if r["neuron"] == 1}
    assert neuron1["agglomerative"]["ari"] > 0.6
    assert neuron1["agglomerative"]["ari"] > neuron1["threshold_graph"]["ari"]


def test_sparser_inputs_give_more_polysemantic_neurons():
    """Jermyn et al.'s qualitative result, on two seeded models: dense inputs, most neurons monosemantic;
    sparse inputs, neurons share features (superposition)."""
    shares = {}
    for sparsity in (0.0, 0.9):
        tensors, record = train_toy(ToySettings(sparsity=sparsity, steps=1500, seed=0))
        truth = true_features(tensors["W"], 0.3)
        shares[sparsity] = np.mean([len(t) > 1 for t in truth])
        assert record["final_loss"] is not None
    assert shares[0.9] > shares[0.0], shares
    assert shares[0.9] >= 0.8


def test_run_and_summary_write_their_outputs(tmp_path):
    settings = dict(n_features=8, n_neurons=3, steps=200, batch_size=256)
    probe = ProbeSettings(single_per_feature=10, multi=50)
    paths = []
    for sparsity, dim in ((0.0, None), (0.9, 16)):
        scores = tmp_path / f"scores-{sparsity}.parquet"
        run_toy(ToySettings(sparsity=sparsity, input_dim=dim, **settings), probe, [0.3, 0.6],
                ["threshold_graph", "agglomerative"], tmp_path / f"model-{sparsity}.safetensors", scores)
        table = read_parquet(scores, TOY_SCORES)
        assert table.num_rows == 3 * 2 * 2
        assert set(table.column("input_dim").to_pylist()) == {dim or 0}
        paths.append(scores)
    choice = summarize_toys(paths, tmp_path / "recovery.parquet", tmp_path / "choice.json", tmp_path / "recovery.png")
    data = json.loads((tmp_path / "choice.json").read_text())
    assert choice["method"] in ("threshold_graph", "agglomerative") and choice["threshold"] in (0.3, 0.6)
    best = max(c["mean_ari"] for c in data["candidates"])
    assert data["choice"]["mean_ari"] >= best - 0.005
    assert [(r["input_dim"], r["sparsity"]) for r in data["by_sparsity"]] == [(0, 0.0), (16, 0.9)]
    assert (tmp_path / "recovery.png").stat().st_size > 1000
