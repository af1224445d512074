"""Token importance: the batched, shared masked variants against one forward pass per variant, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from neuron_embeddings.adapters import MLPCapture, adapter_for, run_capture
from neuron_embeddings.importance import normalise, plan_variants, run_variants


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tiny_llama if request.param == "llama" else make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
    return AutoModelForCausalLM.from_pretrained(folder).float().eval()


def one_pass(model, layer: int, ids: list[int], pos: int, neuron: int, masked: int, pad_id: int) -> float:
    """The reference: the neuron's activation at pos, for this window alone, token `masked` padded."""
    ids = list(ids[: pos + 1])
    if masked >= 0:
        ids[masked] = pad_id
    adapter = adapter_for(model)
    with MLPCapture(model, adapter, [layer], stop_after_last=True) as capture, torch.inference_mode():
        run_capture(adapter.body(model), torch.tensor([ids]))
        return float(capture.captured[layer]["act"][0, pos, neuron])


def random_examples(seed: int, vocab: int, n_neurons: int):
    rng = np.random.default_rng(seed)
    windows = {w: rng.integers(3, vocab, size=int(rng.integers(8, 17))).tolist() for w in (4, 9, 11)}
    window = rng.choice(list(windows), size=14)
    pos = np.array([rng.integers(1, len(windows[w])) for w in window])
    first = np.maximum(1, pos - rng.integers(0, 6, size=len(pos)))  # position 0 is the BOS: never padded
    neuron = rng.integers(0, n_neurons, size=len(pos))
    return windows, window, pos, first, neuron


def test_plan_covers_every_example_once_and_shares_variants():
    window = np.array([7, 7, 7, 2])
    pos = np.array([5, 8, 5, 3])
    first = np.array([2, 6, 4, 1])
    plan = plan_variants(window, pos, first)
    entries = list(zip(plan["entry_example"].tolist(), plan["entry_masked"].tolist()))
    for i in range(4):
        assert [m for e, m in entries if e == i] == [-1, *range(first[i], pos[i] + 1)]
    keys = set(zip(plan["window"].tolist(), plan["masked"].tolist()))
    assert len(keys) == len(plan["window"])  # every variant once
    assert (7, 5) in keys and (7, -1) in keys
    assert len(keys) == 1 + 7 + 1 + 3  # window 7: unmasked, positions 2..8; window 2: unmasked, 1..3
    # a variant runs up to the last position any of its entries reads, and no further
    for v in range(len(plan["window"])):
        read = pos[plan["entry_example"][plan["entry_variant"] == v]]
        assert plan["length"][v] == read.max() + 1
    assert np.all(np.diff(plan["length"]) <= 0)  # longest first


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_variants_equal_one_pass_each(tiny_model, batch_size):
    model = tiny_model
    adapter = adapter_for(model)
    layer = adapter.n_layers(model) - 2
    pad_id = 0
    windows, window, pos, first, neuron = random_examples(0, model.config.vocab_size, adapter.n_neurons(model))
    plan = plan_variants(window, pos, first)
    e = plan["entry_example"]
    values = run_variants(model, layer, plan, windows, neuron[e], pos[e], pad_id, batch_size, torch.device("cpu"))
    reference = np.array(
        [one_pass(model, layer, windows[int(window[i])], int(pos[i]), int(neuron[i]), int(m), pad_id)
         for i, m in zip(e.tolist(), plan["entry_masked"].tolist())]
    )
    assert np.allclose(values, reference, atol=1e-5, rtol=1e-4)
    # padding changes something: the test would pass vacuously if every variant read the same number
    assert np.ptp(values) > 1e-3


def test_normalise_follows_the_paper_and_its_edge_cases():
    imp, norm = normalise(np.array([0.5, -0.2, 3.0, 2.0]))  # last = the max token's own drop
    assert norm == 2.0
    assert imp.tolist() == pytest.approx([0.25, 0.0, 1.0, 1.0])
    imp, norm = normalise(np.array([0.4, 0.1, -0.3]))  # padding the max token raised it: largest drop instead
    assert norm == pytest.approx(0.4) and imp.tolist() == pytest.approx([1.0, 0.25, 0.0])
    imp, norm = normalise(np.array([-0.1, 0.0]))  # nothing lowers the activation
    assert norm == 0.0 and imp.tolist() == [0.0, 0.0]
