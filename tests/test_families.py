"""The family matrix: every decoder-only family of the installed transformers, built offline from its config class
with tiny random sizes, saved, and taken through what a user's model goes through: prepare_model (the MLP found
on the meta device, then verified on one real batch), the capture hooks, the embedding invariant
sum(x * w) + b = pre-activation on real forward passes, the truncated load of the caching stages and the
by-name weight reads of the embedding stage.

The expected module names below are this test's own knowledge of each family, written independently of the
discovery code: discovery must find exactly these.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from families import DENSE, MOE, save_tiny_model, tiny_config  # noqa: E402
from neuron_embeddings import adapters  # noqa: E402
from neuron_embeddings.errors import PipelineError  # noqa: E402
from neuron_embeddings.models import (  # noqa: E402
    MANIFEST,
    inspect_source,
    layer_input_weights,
    load_prepared,
    prepare_model,
)
from neuron_embeddings.sources import ModelSource  # noqa: E402

GATED = ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"
# family -> (input projection modules, gate first; output projection), relative to a block
EXPECTED: dict[str, tuple[tuple[str, ...], str]] = {
    "gpt2": (("mlp.c_fc",), "mlp.c_proj"),
    "gpt_neox": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "gptj": (("mlp.fc_in",), "mlp.fc_out"),
    "opt": (("fc1",), "fc2"),  # no MLP module: the projections sit on the decoder layer
    "bloom": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "falcon": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "phi": (("mlp.fc1",), "mlp.fc2"),
    "phi3": (("mlp.gate_up_proj", "mlp.gate_up_proj"), "mlp.down_proj"),  # fused: gate = first half of the rows
    "starcoder2": (("mlp.c_fc",), "mlp.c_proj"),
    **{family: GATED for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                                    "olmo2", "stablelm", "granite", "cohere")},
    # mixtures of experts: every expert's gate and up in one [E, 2F, d] parameter, gate first
    **{family: (("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj"), "mlp.experts.down_proj")
       for family in MOE},
}
# family -> (experts, neurons per expert, shared expert's neurons), from tests/families.py's configs
EXPERTS = {"mixtral": (4, 48, 0), "olmoe": (4, 48, 0), "qwen2_moe": (4, 24, 40)}
BATCH, SEQ = 3, 10


def test_matrix_covers_the_issue_families():
    assert set(DENSE) | set(MOE) == set(EXPECTED)
    assert len(DENSE) + len(MOE) >= 24


@pytest.fixture(scope="module", params=DENSE + MOE)
def prepared(request, tmp_path_factory):
    """(family, the saved checkpoint, its prepared folder, the prepared model loaded whole)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"family-{family}")
    source = save_tiny_model(root / "source", family)
    info = prepare_model(ModelSource(str(source)), root / "model")
    model, _, _ = load_prepared(root / "model")
    return family, source, root / "model", model, info


def test_layout_is_found_and_verified(prepared):
    family, _, model_dir, model, info = prepared
    modules, out_proj = EXPECTED[family]
    layout = adapters.MLPLayout.from_json(json.loads((model_dir / MANIFEST).read_text())["layout"])
    assert layout.family == family == info.family
    assert tuple(p.module for p in layout.projections) == modules
    assert layout.out_proj == out_proj
    if family == "phi3" or family in MOE:
        assert [p.half for p in layout.projections] == [0, 1]
        assert layout.projection_names == ["gate_up_proj.gate", "gate_up_proj.up"]
    assert info.n_projections == len(modules)
    assert info.d_model == 32 and info.n_layers == 3
    assert info.verification["pre_error"] < 1e-5 and info.verification["act_error"] <= 1e-5
    if family in MOE:
        n_experts, per_expert, shared = EXPERTS[family]
        experts = layout.experts
        assert (experts.module, experts.n_experts, experts.per_expert, experts.shared_neurons) == (
            "mlp.experts", n_experts, per_expert, shared)
        assert info.n_neurons == n_experts * per_expert + shared
        assert not info.weights_by_name  # saved with one tensor per expert: the embedding stage loads the block
    else:
        assert layout.experts is None and info.weights_by_name


def test_embedding_invariant_on_real_forward_passes(prepared):
    """sum_j x[t, j] * W[n, j] + b[n] is the model's own pre-activation for every neuron, token and projection,
    and act(pre) (act(gate) * up when gated) is the output projection's input."""
    family, _, _, model, info = prepared
    adapter = adapters.adapter_for(model)
    ids = torch.randint(3, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    layers = list(range(info.n_layers))
    if family in MOE:
        return _check_experts(model, adapter, ids, layers, info)
    with adapters.MLPCapture(model, adapter, layers, stop_after_last=True) as capture, torch.no_grad():
        adapters.run_capture(adapter.body(model), ids)
    n = info.n_neurons
    for layer in layers:
        slot = capture.captured[layer]
        x = slot["x"]
        assert x.shape == (BATCH, SEQ, 32)
        for (W, b), pre in zip(adapter.input_weights(model, layer), slot["pre"]):
            assert W.shape == (n, 32) and pre.shape == (BATCH, SEQ, n)
            embedding = x[:, :, None, :] * W[None, None, :, :]  # one embedding per (token, neuron)
            torch.testing.assert_close(embedding.sum(-1) + b, pre, atol=1e-5, rtol=1e-5)
        act = adapter.activation_from_pre(model, layer, slot["pre"])
        torch.testing.assert_close(act, slot["act"], atol=1e-6, rtol=1e-6)
        assert slot["act"].shape == (BATCH, SEQ, n)


def _check_experts(model, adapter, ids, layers, info):
    """Mixture of experts: the test's own arithmetic from the experts' parameters, on the tokens the model itself
    routed (the experts module's arguments, caught by the test's own hook)."""
    import torch.nn.functional as F

    routed_args, shared_in, handles = {}, {}, []
    for layer in layers:
        mlp = adapter.block(model, layer).mlp
        handles.append(mlp.experts.register_forward_pre_hook(
            lambda _m, args, layer=layer: routed_args.__setitem__(layer, [a.detach().clone() for a in args])))
        if hasattr(mlp, "shared_expert"):
            handles.append(mlp.shared_expert.down_proj.register_forward_pre_hook(
                lambda _m, args, layer=layer: shared_in.__setitem__(layer, args[0].detach().clone())))
    try:
        with adapters.MLPCapture(model, adapter, layers, stop_after_last=False) as capture, torch.no_grad():
            adapters.run_capture(adapter.body(model), ids)
    finally:
        for handle in handles:
            handle.remove()
    n_experts, per_expert, shared = EXPERTS[info.family]
    for layer in layers:
        slot = capture.captured[layer]
        x_flat, index = routed_args[layer][0], routed_args[layer][1]
        assert torch.equal(slot["x"].reshape(x_flat.shape), x_flat)
        experts = adapter.block(model, layer).mlp.experts
        pre_gate = slot["pre"][0].reshape(len(x_flat), -1)
        pre_up = slot["pre"][1].reshape(len(x_flat), -1)
        act = slot["act"].reshape(len(x_flat), -1)
        valid = slot["unit_valid"].reshape(len(x_flat), -1)
        assert act.shape[1] == n_experts * per_expert + shared
        for t in range(len(x_flat)):
            chosen = set(index[t].tolist())
            for e in range(n_experts):
                cols = slice(e * per_expert, (e + 1) * per_expert)
                assert bool(valid[t, cols].all()) == (e in chosen)
                if e not in chosen:
                    assert not act[t, cols].any()  # the unit contributes nothing where its expert did not run
                    continue
                gate, up = F.linear(x_flat[t], experts.gate_up_proj[e]).chunk(2, dim=-1)
                torch.testing.assert_close(pre_gate[t, cols], gate, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(pre_up[t, cols], up, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(act[t, cols], experts.act_fn(gate) * up, atol=1e-6, rtol=1e-6)
        for (W, b), pre in zip(adapter.input_weights(model, layer), slot["pre"]):
            embedding = slot["x"][:, :, None, :] * W[None, None]  # the invariant, unit by unit
            torch.testing.assert_close(embedding.sum(-1) + b, pre, atol=1e-5, rtol=1e-5)
        if shared:
            torch.testing.assert_close(act[:, n_experts * per_expert :], shared_in[layer].reshape(len(x_flat), -1),
                                       atol=1e-6, rtol=1e-6)


def test_truncated_load_and_by_name_weights_match_the_whole_model(prepared):
    family, _, model_dir, model, info = prepared
    ids = torch.randint(3, 300, (2, SEQ), generator=torch.Generator().manual_seed(2))
    short, _, _ = load_prepared(model_dir, up_to_layer=1)
    assert adapters.adapter_for(short).n_layers(short) == 2  # block 2 never built
    got = {}
    for name, m in (("whole", model), ("short", short)):
        adapter = adapters.adapter_for(m)
        with adapters.MLPCapture(m, adapter, [1], stop_after_last=True) as capture, torch.no_grad():
            adapters.run_capture(adapter.body(m), ids)
        got[name] = capture.captured[1]
    torch.testing.assert_close(got["short"]["act"], got["whole"]["act"], atol=0, rtol=0)
    adapter = adapters.adapter_for(model)
    for layer in range(info.n_layers):
        by_name = layer_input_weights(model_dir, layer)
        for (W, b), (W_ref, b_ref) in zip(by_name, adapter.input_weights(model, layer)):
            assert torch.equal(W, W_ref) and torch.equal(b, b_ref)


@pytest.mark.parametrize("family", MOE)
def test_mixture_of_experts_is_read_from_its_config_alone(family, tmp_path):
    folder = tmp_path / family
    tiny_config(family).save_pretrained(folder)  # a config and no weights: what a hub id offers first
    inspection = inspect_source(ModelSource(str(folder)))
    n_experts, per_expert, shared = EXPERTS[family]
    assert inspection.candidates.experts.n_units == inspection.candidates.n_neurons == n_experts * per_expert + shared


@pytest.mark.parametrize("family, name", [("gpt2", "GPT2LMHeadModel"), ("mixtral", "MixtralForCausalLM")])
def test_wrong_activation_fails_with_family_layer_and_mismatch(family, name):
    """A reading that cannot reproduce the activation stops with one line naming the family, layer and error:
    GPT-2 uses the tanh GELU and Mixtral SiLU; offered only the erf GELU, verification must refuse (for GPT-2 the
    two GELUs differ by ~1e-4)."""
    from families import tiny_model

    model = tiny_model(family)
    candidates = adapters.find_candidates(model)
    wrong = adapters.Candidates(**{**candidates.__dict__, "activations": ("config:gelu",)})
    with pytest.raises(PipelineError) as info:
        adapters.verify(model, wrong, adapters.verification_ids(model))
    message = str(info.value)
    assert f"{name} (model_type '{family}')" in message and "layer " in message and "off by" in message
    assert "\n" not in message


def test_gate_order_is_decided_by_the_forward_pass(monkeypatch):
    """With names that do not say which projection is the gate, both orders are tried and the right one kept."""
    from families import tiny_model

    monkeypatch.setattr(adapters, "OVERRIDES", {"llama": {"gate_first": False}})  # deliberately wrong first guess
    model = tiny_model("llama")
    candidates = adapters.find_candidates(model)
    assert candidates.orderings[0][0].module == "mlp.up_proj"
    layout = adapters.verify(model, candidates, adapters.verification_ids(model)).layout
    assert [p.module for p in layout.projections] == ["mlp.gate_proj", "mlp.up_proj"]


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_gguf_checkpoints_of_other_families(family, tmp_path):
    """model.gguf_file for families beyond the demo's Llama: Qwen2, and Phi-3 with its fused gate_up. The prepared
    model verifies its layout and computes what the Hugging Face checkpoint computes."""
    from gguf_writer import write_gguf
    from transformers import AutoModelForCausalLM

    hf = save_tiny_model(tmp_path / "hf", family)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(hf, gguf_dir / "tiny.gguf", family)
    info = prepare_model(ModelSource(str(gguf_dir), gguf_file="tiny.gguf"), tmp_path / "model")
    assert info.family == family and info.verification["act_error"] <= 1e-5
    assert info.n_projections == 2
    prepared, _, _ = load_prepared(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.randint(3, 300, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert_token_texts_are_the_tokenizers(tmp_path / "model")


def assert_token_texts_are_the_tokenizers(model_dir):
    """The prepared folder's token texts are what its tokenizer decodes, id by id, past the table's end too."""
    from neuron_embeddings.models import load_tokenizer
    from neuron_embeddings.vocab import TokenTexts

    tokenizer, texts = load_tokenizer(model_dir), TokenTexts(model_dir)
    assert len(texts.texts) == len(tokenizer) > 0
    for token_id in list(range(len(tokenizer))) + [len(tokenizer) + 5]:
        assert texts(token_id) == tokenizer.decode([token_id]), token_id
    assert texts.special_id("pad_token_id") == tokenizer.pad_token_id
    assert texts.special_id("eos_token_id") == tokenizer.eos_token_id


def test_token_texts_of_a_prepared_model(prepared):
    assert_token_texts_are_the_tokenizers(prepared[2])


def test_hub_id_is_checked_from_its_config_before_any_weight_is_fetched(tmp_path, monkeypatch):
    """A hub id whose cache holds only config.json (what the hub serves first): a family the method cannot apply to
    is refused from the config alone, so no weight file is ever asked for; a supported one gets as far as the
    weights."""
    import huggingface_hub

    cache = tmp_path / "hub"
    for repo, family in (("someone/tiny-unsupported", "mamba"), ("someone/tiny-dense", "qwen2")):
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        if family == "mamba":
            from transformers import AutoConfig

            AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=320).save_pretrained(snapshot)
        else:
            tiny_config(family).save_pretrained(snapshot)
        (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
        (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as refused:
        prepare_model(ModelSource("someone/tiny-unsupported"), tmp_path / "moe")
    assert "state-space model" in str(refused.value) and "'mamba'" in str(refused.value)
    inspection = inspect_source(ModelSource("someone/tiny-dense"))  # the shape, from the config alone
    assert (inspection.candidates.n_layers, inspection.candidates.n_neurons) == (3, 48)
    with pytest.raises(PipelineError) as no_weights:
        prepare_model(ModelSource("someone/tiny-dense"), tmp_path / "dense")
    assert "could not load" in str(no_weights.value)  # it got past the check to the (absent) weights
    assert not (tmp_path / "moe").exists() and not (tmp_path / "dense").exists()


def test_auto_sign_is_both_for_gated_mlps_and_positive_otherwise():
    from types import SimpleNamespace

    from neuron_embeddings.activations import resolve_sign

    assert resolve_sign("auto", SimpleNamespace(n_projections=2)) == "both"  # act(gate) * up
    assert resolve_sign("auto", SimpleNamespace(n_projections=1)) == "positive"  # GELU, ReLU
    assert resolve_sign("negative", SimpleNamespace(n_projections=2)) == "negative"


def test_token_texts_are_optional(tiny_llama, tmp_path):
    """A tokenizer that cannot decode id by id gets no table, and a folder without one (prepared by an earlier
    version) is read through its tokenizer."""
    from neuron_embeddings.models import load_tokenizer
    from neuron_embeddings.vocab import TOKEN_TEXTS, TokenTexts, write_token_texts

    class Refuses:
        def __len__(self):
            return 3

        def batch_decode(self, ids):
            raise ValueError("no")

    assert write_token_texts(Refuses(), tmp_path) == 0 and not (tmp_path / TOKEN_TEXTS).exists()
    assert not (tiny_llama / TOKEN_TEXTS).exists()
    tokenizer, texts = load_tokenizer(tiny_llama), TokenTexts(tiny_llama)
    assert [texts(i) for i in range(20)] == [tokenizer.decode([i]) for i in range(20)]
    assert texts.special_id("pad_token_id") == tokenizer.pad_token_id


@pytest.mark.parametrize("path", ["bytes", "prefix decoding"])
def test_characters_split_over_tokens_read_as_the_text(tiny_llama, monkeypatch, path):
    """A byte-level BPE splits CJK, emoji and accented characters over tokens that each decode alone to U+FFFD;
    the embeddings' token and context columns give each token the characters it completes, so the report and
    the explorer show the text, not a row of U+FFFD (tokens that complete nothing get ""). From the tokens' bytes
    (a byte-level BPE), or by decoding growing prefixes (any other tokenizer)."""
    import numpy as np

    from neuron_embeddings import embeddings
    from neuron_embeddings.embeddings import split_characters
    from neuron_embeddings.models import load_tokenizer
    from neuron_embeddings.vocab import TokenTexts

    if path == "prefix decoding":
        monkeypatch.setattr(embeddings, "token_bytes", lambda tokenizer, ids: None)
    else:
        assert embeddings.token_bytes(load_tokenizer(tiny_llama), [0, 1]) is not None

    tokenizer, texts = load_tokenizer(tiny_llama), TokenTexts(tiny_llama)
    contexts = ["the 猫 sat on 🐍 mat", "naïve café 数据"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in contexts]
    context_ids = np.array([i for row in ids for i in row])
    offsets = np.cumsum([0] + [len(row) for row in ids])
    vocab = np.unique(context_ids)
    code = np.zeros(int(vocab.max()) + 1, np.int64)
    code[vocab] = np.arange(len(vocab))
    lone = [texts(int(i)) for i in vocab]
    assert sum("\ufffd" in t for t in lone) >= 4  # the case at hand: lone bytes of multi-byte characters
    extra = split_characters(context_ids, code[context_ids], offsets, lone, texts)
    shown = [extra.get(flat, lone[code[i]]) for flat, i in enumerate(context_ids)]
    for row, text in enumerate(contexts):
        assert "".join(shown[offsets[row] : offsets[row + 1]]) == text
    assert not any("\ufffd" in t for t in shown)
    # a context cut inside a character keeps that character's bytes as U+FFFD, on its last token
    snake = tokenizer("🐍", add_special_tokens=False)["input_ids"]
    cut = np.array(snake[:-1])
    cut_code = np.zeros(int(cut.max()) + 1, np.int64)
    cut_lone = [texts(int(i)) for i in np.unique(cut)]
    cut_code[np.unique(cut)] = np.arange(len(cut_lone))
    pieces = split_characters(cut, cut_code[cut], np.array([0, len(cut)]), cut_lone, texts)
    assert "\ufffd" in pieces[len(cut) - 1] and "".join(pieces.values()).strip("\ufffd") == ""
