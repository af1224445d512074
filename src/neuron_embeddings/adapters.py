"""Where, per architecture, a transformer's MLP keeps what the neuron-embedding method needs.

Named hook points, in the spirit of TransformerLens, one per tensor:

- `blocks.{L}.mlp.hook_in`: the MLP input x, i.e. the input of the MLP module. For GPT-2 this is the output of
  `ln_2` *after* its scale and shift (Hugging Face's `ln_2`, not TransformerLens's `ln2.hook_normalized`, which
  is taken before them); for Llama-style models, the output of `post_attention_layernorm` including its weight.
  Nothing is folded into the weights, so x . w_n + b_n is exactly the model's own pre-activation.
- `blocks.{L}.mlp.hook_pre.{proj}`: each input projection's output (the pre-activation), as the model computed it.
- `blocks.{L}.mlp.hook_post`: the neuron activation, i.e. the input of the output projection.

For a plain MLP the activation is act(w . x + b); for a gated MLP (SwiGLU) it is act(w_gate . x) * (w_up . x),
and the neuron's embedding is [x * w_gate, x * w_up], one Hadamard product per input projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import PipelineError

if TYPE_CHECKING:  # torch is only needed once a model exists; the config checks read ARCHITECTURES without it
    import torch


@dataclass(frozen=True)
class ArchitectureSpec:
    body: str  # the model without its LM head
    layers: str  # the list of transformer blocks, relative to the model
    mlp: str  # the MLP module, relative to a block
    in_projs: tuple[str, ...]  # input projections, relative to the MLP; gate first for gated MLPs
    out_proj: str  # output projection, relative to the MLP; its input is the activation
    act: str  # activation module, relative to the MLP
    conv1d: bool  # GPT-2's Conv1D stores weights as [d_in, d_out]; nn.Linear as [d_out, d_in]
    activation: str  # for people: what the activation is

    @property
    def gated(self) -> bool:
        return len(self.in_projs) == 2


GPT2 = ArchitectureSpec("transformer", "transformer.h", "mlp", ("c_fc",), "c_proj", "act", True, "GELU (tanh)")
GPT_NEOX = ArchitectureSpec(
    "gpt_neox", "gpt_neox.layers", "mlp", ("dense_h_to_4h",), "dense_4h_to_h", "act", False, "GELU"
)
GATED = ArchitectureSpec(
    "model", "model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn", False, "act(gate) * up (SiLU)"
)

# model_type (config.json) -> spec. Gated Llama-family models share one layout.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "llama": GATED,
    "mistral": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
}


def _get(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


class StopForward(Exception):
    """Raised from a hook once the last needed layer is captured: later layers and the LM head never run."""


@dataclass
class ModelAdapter:
    spec: ArchitectureSpec

    def body(self, model: torch.nn.Module) -> torch.nn.Module:
        return _get(model, self.spec.body)

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(model, self.spec.layers)  # type: ignore[return-value]

    def n_layers(self, model: torch.nn.Module) -> int:
        return len(self.blocks(model))

    def mlp(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return _get(self.blocks(model)[layer], self.spec.mlp)

    def projection(self, model: torch.nn.Module, layer: int, name: str) -> torch.nn.Module:
        return _get(self.mlp(model, layer), name)

    def d_model(self, model: torch.nn.Module) -> int:
        return int(self.input_weights(model, 0)[0][0].shape[1])

    def n_neurons(self, model: torch.nn.Module) -> int:
        return int(self.input_weights(model, 0)[0][0].shape[0])

    def input_weights(self, model: torch.nn.Module, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per input projection: (W [n_neurons, d_model], b [n_neurons]); b is zeros where there is no bias."""
        out = []
        for name in self.spec.in_projs:
            proj = self.projection(model, layer, name)
            weight = proj.weight.detach().float()
            weight = weight.T if self.spec.conv1d else weight
            bias = proj.bias.detach().float() if getattr(proj, "bias", None) is not None else None
            out.append((weight.contiguous(), bias if bias is not None else weight.new_zeros(weight.shape[0])))
        return out

    def activation_fn(self, model: torch.nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return _get(self.mlp(model, layer), self.spec.act)

    def activation_from_pre(self, model: torch.nn.Module, layer: int, pre: list[torch.Tensor]) -> torch.Tensor:
        act = self.activation_fn(model, layer)(pre[0])
        return act * pre[1] if self.spec.gated else act

    def hook_names(self, layer: int) -> dict[str, str]:
        names = {"in": f"blocks.{layer}.mlp.hook_in", "post": f"blocks.{layer}.mlp.hook_post"}
        names.update({f"pre.{p}": f"blocks.{layer}.mlp.hook_pre.{p}" for p in self.spec.in_projs})
        return names


class MLPCapture:
    """Forward hooks that record, per requested layer, x, the pre-activations and the activation of a batch.

    `captured[layer]` holds {"x": [B, T, d], "pre": [[B, T, N], ...], "act": [B, T, N]} after a forward pass.
    With stop_after_last, the hook of the deepest requested layer raises StopForward, so nothing past it runs.
    """

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], stop_after_last: bool):
        self.captured: dict[int, dict] = {layer: {} for layer in layers}
        self._handles = []
        last = max(layers)
        for layer in layers:
            slot = self.captured[layer]
            mlp = adapter.mlp(model, layer)
            self._handles.append(mlp.register_forward_pre_hook(self._store_input(slot, "x")))
            slot["pre"] = [None] * len(adapter.spec.in_projs)
            for i, name in enumerate(adapter.spec.in_projs):
                proj = adapter.projection(model, layer, name)
                self._handles.append(proj.register_forward_hook(self._store_pre(slot, i)))
            out = adapter.projection(model, layer, adapter.spec.out_proj)
            self._handles.append(
                out.register_forward_pre_hook(self._store_input(slot, "act", stop=stop_after_last and layer == last))
            )

    @staticmethod
    def _store_input(slot: dict, key: str, stop: bool = False):
        def hook(_module, args):
            slot[key] = args[0].detach()
            if stop:
                raise StopForward

        return hook

    @staticmethod
    def _store_pre(slot: dict, index: int):
        def hook(_module, _args, output):
            slot["pre"][index] = output.detach()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MLPCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise PipelineError(
            f"no adapter for architecture {type(model).__name__} (model_type '{model_type}'); "
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ModelAdapter(spec)


def run_capture(body: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """Run the model body for its hooks' sake; StopForward ends it early on purpose."""
    try:
        body(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
