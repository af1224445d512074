"""Adapters: where each architecture's MLP keeps x, W, b, the pre-activations and the activation.

Every check here uses the test's own forward hooks, written independently of neuron_embeddings.adapters, on
tiny random-init checkpoints that go through save_pretrained / from_pretrained like a user's model would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from neuron_embeddings import adapters  # noqa: E402
from neuron_embeddings.errors import PipelineError  # noqa: E402

VOCAB = 100
SEQ = 12
BATCH = 3


def _config(arch: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    special = dict(bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=64, **special)
    if arch == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             vocab_size=VOCAB, max_position_embeddings=64, **special)
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, mlp_bias=False, **special)


# arch -> (model_type, input projections, output projection, final norm of the body, n_neurons, has bias)
EXPECTED = {
    "gpt2": ("gpt2", ("c_fc",), "c_proj", "ln_f", 64, True),
    "gpt_neox": ("gpt_neox", ("dense_h_to_4h",), "dense_4h_to_h", "final_layer_norm", 64, True),
    "llama": ("llama", ("gate_proj", "up_proj"), "down_proj", "norm", 48, False),
}


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def tiny(request, tmp_path_factory):
    """(arch, model loaded back with from_pretrained, random input ids)."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(_config(arch))
    # Hugging Face initialises every bias to 0 and every norm weight to 1; perturb all 1-d parameters so that
    # the bias term of the invariant and the norm's scale and shift (part of x) are really exercised.
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    folder: Path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    loaded.float().eval()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return arch, loaded, ids


def _module(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return root.get_submodule(dotted)


def _own_capture(model, arch, ids, layers):
    """The test's own hooks: x (MLP input), each projection's output, and the output projection's input."""
    _, in_projs, out_proj, _, _, _ = EXPECTED[arch]
    prefix = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers"}[arch]
    got = {layer: {"pre": {}} for layer in layers}
    handles = []

    def pre_hook(slot, key):
        def hook(_m, args):
            slot[key] = args[0].detach().clone()

        return hook

    def fwd_hook(slot, name):
        def hook(_m, _args, output):
            slot["pre"][name] = output.detach().clone()

        return hook

    try:
        for layer in layers:
            mlp = _module(model, f"{prefix}.{layer}.mlp")
            slot = got[layer]
            handles.append(mlp.register_forward_pre_hook(pre_hook(slot, "x")))
            for name in in_projs:
                handles.append(_module(mlp, name).register_forward_hook(fwd_hook(slot, name)))
            handles.append(_module(mlp, out_proj).register_forward_pre_hook(pre_hook(slot, "act")))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return got


def test_loaded_checkpoint_has_perturbed_parameters(tiny):
    arch, model, _ = tiny
    model_type, in_projs, _, _, _, has_bias = EXPECTED[arch]
    assert model.config.model_type == model_type
    adapter = adapters.adapter_for(model)
    assert adapter.layout.family == model_type
    assert tuple(adapter.layout.projection_names) == in_projs
    for layer in range(2):
        proj = adapter.block(model, layer).get_submodule(f"mlp.{in_projs[0]}")
        if has_bias:
            assert proj.bias is not None and float(proj.bias.detach().abs().sum()) > 0
        else:
            assert getattr(proj, "bias", None) is None


def test_shapes_and_counts(tiny):
    arch, model, _ = tiny
    _, in_projs, _, _, n_neurons, _ = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    assert adapter.n_layers(model) == 2
    assert adapter.d_model(model) == 32
    assert adapter.n_neurons(model) == n_neurons
    assert adapter.layout.gated == (len(in_projs) == 2)
    for layer in range(2):
        weights = adapter.input_weights(model, layer)
        assert len(weights) == len(in_projs)
        for W, b in weights:
            assert W.shape == (n_neurons, 32)
            assert b.shape == (n_neurons,)
            assert W.dtype == torch.float32 and b.dtype == torch.float32
    names = adapter.hook_names(1)
    assert names["in"] == "blocks.1.mlp.hook_in"
    assert names["post"] == "blocks.1.mlp.hook_post"
    assert {k for k in names if k.startswith("pre.")} == {f"pre.{p}" for p in in_projs}


def test_embedding_invariant_every_layer_and_projection(tiny):
    """sum_j x[t, j] * W[n, j] + b[n] is the model's own pre-activation, for every neuron, token, projection."""
    arch, model, ids = tiny
    _, in_projs, _, _, n_neurons, has_bias = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    got = _own_capture(model, arch, ids, [0, 1])
    for layer in range(2):
        x = got[layer]["x"]  # [B, T, d]
        assert x.shape == (BATCH, SEQ, 32)
        weights = adapter.input_weights(model, layer)
        for (W, b), name in zip(weights, in_projs):
            pre = got[layer]["pre"][name]
            assert pre.shape == (BATCH, SEQ, n_neurons)
            embedding = x[:, :, None, :] * W[None, None, :, :]  # [B, T, N, d]: one embedding per neuron
            rebuilt = embedding.sum(-1) + b
            torch.testing.assert_close(rebuilt, pre, atol=1e-4, rtol=0)
            if has_bias:
                # the bias matters: leaving it out breaks the invariant
                assert (embedding.sum(-1) - pre).abs().max() > 1e-2


def test_weights_match_module_parameters(tiny):
    arch, model, _ = tiny
    _, in_projs, _, _, _, _ = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    for layer in range(2):
        for (W, b), name in zip(adapter.input_weights(model, layer), in_projs):
            proj = adapter.block(model, layer).get_submodule(f"mlp.{name}")
            expected = proj.weight.detach().T if arch == "gpt2" else proj.weight.detach()  # Conv1D: [d_in, d_out]
            torch.testing.assert_close(W, expected, atol=0, rtol=0)
            expected_b = proj.bias.detach() if proj.bias is not None else torch.zeros(W.shape[0])
            torch.testing.assert_close(b, expected_b, atol=0, rtol=0)


def test_activation_from_pre_is_output_projection_input(tiny):
    arch, model, ids = tiny
    _, in_projs, _, _, _, _ = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    got = _own_capture(model, arch, ids, [0, 1])
    for layer in range(2):
        pre = [got[layer]["pre"][name] for name in in_projs]
        act = adapter.activation_from_pre(model, layer, pre)
        torch.testing.assert_close(act, got[layer]["act"], atol=1e-5, rtol=1e-5)
        if arch == "llama":
            silu = torch.nn.functional.silu(pre[0]) * pre[1]
            torch.testing.assert_close(got[layer]["act"], silu, atol=1e-5, rtol=1e-5)
        else:
            # a plain MLP: the activation is an elementwise function of the single pre-activation
            assert len(pre) == 1
            assert not torch.allclose(act, pre[0])


@pytest.mark.parametrize("layers", [[0], [1], [0, 1]])
def test_mlp_capture_matches_own_hooks_and_stops_early(tiny, layers):
    arch, model, ids = tiny
    _, in_projs, _, final_norm, _, _ = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    reference = _own_capture(model, arch, ids, [0, 1])
    body = adapter.body(model)
    last = max(layers)

    fired: list[str] = []
    watch = {"final_norm": _module(body, final_norm)}
    if last == 0:
        watch["next_block"] = adapter.blocks(model)[1]
        watch["next_mlp"] = adapter.blocks(model)[1].mlp
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: fired.append(name)) for name, m in watch.items()]
    head = model.get_output_embeddings()
    handles.append(head.register_forward_pre_hook(lambda _m, _a: fired.append("lm_head")))
    try:
        with adapters.MLPCapture(model, adapter, layers, stop_after_last=True) as capture, torch.no_grad():
            adapters.run_capture(body, ids)  # StopForward must not escape
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []
    assert set(capture.captured) == set(layers)
    for layer in layers:
        slot = capture.captured[layer]
        torch.testing.assert_close(slot["x"], reference[layer]["x"], atol=1e-6, rtol=1e-6)
        assert len(slot["pre"]) == len(in_projs)
        for captured, name in zip(slot["pre"], in_projs):
            torch.testing.assert_close(captured, reference[layer]["pre"][name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(slot["act"], reference[layer]["act"], atol=1e-6, rtol=1e-6)

    # the context manager removed every hook: a fresh forward pass runs to the end and leaves captured alone
    before = capture.captured[last]["act"]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    assert out.logits.shape == (BATCH, SEQ, VOCAB)
    assert capture.captured[last]["act"] is before


def test_mlp_capture_without_stop_runs_everything(tiny):
    arch, model, ids = tiny
    _, _, _, final_norm, _, _ = EXPECTED[arch]
    adapter = adapters.adapter_for(model)
    body = adapter.body(model)
    fired = []
    handle = _module(body, final_norm).register_forward_pre_hook(lambda _m, _a: fired.append(1))
    try:
        capture = adapters.MLPCapture(model, adapter, [0], stop_after_last=False)
        with torch.no_grad():
            adapters.run_capture(body, ids)
        capture.remove()
    finally:
        handle.remove()
    assert fired == [1]
    assert capture.captured[0]["act"].shape[:2] == (BATCH, SEQ)


def test_unsupported_architecture_raises_pipeline_error():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50, max_position_embeddings=16))
    with pytest.raises(PipelineError) as info:
        adapters.adapter_for(bert)
    message = str(info.value)
    # BERT's MLP is found and verified, but its attention is bidirectional: caught by the causality check
    assert "BertForMaskedLM" in message
    assert "'bert'" in message and "not causal" in message
    assert "\n" not in message


def test_module_without_config_raises_pipeline_error():
    with pytest.raises(PipelineError, match="Linear"):
        adapters.adapter_for(torch.nn.Linear(2, 2))
