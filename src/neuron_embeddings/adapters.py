"""Where a transformer's MLP keeps what the neuron-embedding method needs, found from the model itself.

Named hook points, in the spirit of TransformerLens, one per tensor:

- `blocks.{L}.mlp.hook_in`: the MLP input x, i.e. the input of the MLP's input projection(s). For GPT-2 this is
  the output of `ln_2` *after* its scale and shift (Hugging Face's `ln_2`, not TransformerLens's
  `ln2.hook_normalized`, which is taken before them); for Llama-style models, the output of
  `post_attention_layernorm` including its weight. Nothing is folded into the weights, so x . w_n + b_n is
  exactly the model's own pre-activation.
- `blocks.{L}.mlp.hook_pre.{proj}`: each input projection's output (the pre-activation), as the model computed it.
- `blocks.{L}.mlp.hook_post`: the neuron activation, i.e. the input of the output projection.

For a plain MLP the activation is act(w . x + b); for a gated MLP (SwiGLU, GeGLU) it is act(w_gate . x) * (w_up . x),
and the neuron's embedding is [x * w_gate, x * w_up], one Hadamard product per input projection. A fused
gate_up projection (Phi-3) is split by rows into its two halves.

No table of architectures: `find_candidates` reads one block's module tree (the linear layers outside attention
whose shapes go d_model -> F and F -> d_model, the parameter-free activation module beside them, the config's
activation name), and `verify` runs one real batch and keeps the reading under which x . w + b reproduces every
projection's output and act(pre) the output projection's input, within the dtype's tolerance. A family then
either works, proven on the user's own model, or fails with one line that names the family, the layer and the
size of the mismatch. OVERRIDES holds the little that cannot be read off a model.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import PipelineError

if TYPE_CHECKING:  # torch is only needed once a model exists; the config checks import this module without it
    import torch

# Config keys that name the MLP's activation, in the order families use them.
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function", "activation", "ffn_act_fn")
# Name fragments of a gated MLP's gate projection, and of modules that belong to attention, not the MLP.
GATE_WORDS = ("gate", "w1", "wi_0")
ATTENTION_WORDS = ("attn", "attention")

# model_type -> what discovery cannot read off the module tree. Keys: "activation" (an ACT2FN name tried first),
# "gate_first" (for a gated MLP whose projections' names do not say which is the gate: True when the first
# projection, or the first half of a fused one, is the gate). Verification still checks whatever is put here.
# Every family of the test matrix (tests/test_families.py) is read right without one, so the table is empty.
OVERRIDES: dict[str, dict[str, Any]] = {}

# model_type -> why the method cannot apply: said before any weight is downloaded.
UNSUPPORTED: dict[str, str] = {
    "mamba": "a state-space model: its blocks have no MLP of neurons",
    "mamba2": "a state-space model: its blocks have no MLP of neurons",
    "rwkv": "an RNN: its channel mixing has no MLP of the transformer's form",
}

# Relative tolerances of verification, per compute dtype: |x.w + b - pre| / (1 + sum |x * w|), and
# max |act(pre) - post| / max |post| (for experts, of their rebuilt output). float32 accumulation is ~1e-7 per term;
# a wrong activation (tanh GELU for erf GELU, say) is off by ~1e-4, so the check tells such variants apart.
PRE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
ACT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


@dataclass(frozen=True)
class Projection:
    module: str  # dotted path relative to the block
    half: int | None = None  # of a fused gate_up projection: 0 = the first half of its rows, 1 = the second

    @property
    def leaf(self) -> str:
        return self.module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: every expert's weights in one 3-D parameter per projection ([E, rows, d_model]),
    and optionally a dense shared expert that every token goes through (Qwen2-MoE). Its units are numbered
    expert-major: unit = expert x per_expert + neuron, then the shared expert's neurons (expert = n_experts)."""

    module: str  # the experts module, relative to the block; called as (x, top_k_index, top_k_weights)
    n_experts: int
    per_expert: int  # neurons per expert
    shared: tuple[str, ...] = ()  # the shared expert's input projections (Linear modules), gate first
    shared_out: str = ""  # its output projection
    shared_neurons: int = 0

    @property
    def n_units(self) -> int:
        return self.n_experts * self.per_expert + self.shared_neurons

    def expert_of(self, unit):
        """The expert of each unit (numpy or int): n_experts for the shared expert's neurons."""
        routed = self.n_experts * self.per_expert
        if isinstance(unit, int):
            return unit // self.per_expert if unit < routed else self.n_experts
        import numpy as np

        return np.where(unit < routed, unit // self.per_expert, self.n_experts)


@dataclass(frozen=True)
class MLPLayout:
    """Where one model's MLPs are: written to the prepared model's manifest, read by every later stage."""

    family: str  # model_type
    layers: str  # dotted path of the list of blocks, relative to the model
    projections: tuple[Projection, ...]  # input projections, gate first for a gated MLP (3-D parameters for experts)
    out_proj: str  # relative to the block; its input is the activation (the experts' down_proj parameter)
    activation: str  # "module:<path relative to the block>" or "config:<ACT2FN name>"
    conv1d: bool  # GPT-2's Conv1D stores weights as [d_in, d_out]; nn.Linear as [d_out, d_in]
    experts: Experts | None = None  # a mixture of experts

    @property
    def gated(self) -> bool:
        return len(self.projections) == 2

    @property
    def projection_names(self) -> list[str]:
        """gate_proj, up_proj; c_fc; or gate_up_proj.gate, gate_up_proj.up for the halves of a fused one."""
        return [p.leaf if p.half is None else f"{p.leaf}.{('gate', 'up')[i]}" for i, p in enumerate(self.projections)]

    def describe_activation(self) -> str:
        act = self.activation.split(":", 1)[1]
        return f"act({act})(gate) * up" if self.gated else act

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "projections": [asdict(p) for p in self.projections]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MLPLayout":
        experts = data.get("experts")
        if experts is not None:
            experts = Experts(**{**experts, "shared": tuple(experts.get("shared", ()))})
        return cls(**{**data, "projections": tuple(Projection(**p) for p in data["projections"]), "experts": experts})


@dataclass(frozen=True)
class Candidates:
    """What the module tree says, before a forward pass decides the gate order and the activation."""

    family: str
    layers: str
    orderings: tuple[tuple[Projection, ...], ...]  # most likely first
    out_proj: str
    activations: tuple[str, ...]  # the model's own module first
    conv1d: bool
    d_model: int
    n_neurons: int
    n_layers: int
    experts: Experts | None = None

    def layouts(self) -> Iterator[MLPLayout]:
        for order, act in itertools.product(self.orderings, self.activations):
            yield MLPLayout(self.family, self.layers, order, self.out_proj, act, self.conv1d, self.experts)


def family_of(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _who(model: torch.nn.Module) -> str:
    return f"{type(model).__name__} (model_type '{family_of(model)}')"


def _linear_shape(module: torch.nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, conv1d) of a linear layer, or None for anything else."""
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        return int(weight.shape[0]), int(weight.shape[1]), True
    if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Linear"):
        return int(weight.shape[1]), int(weight.shape[0]), False
    return None


def _in_attention(path: str) -> bool:
    return any(word in part.lower() for part in path.split(".") for word in ATTENTION_WORDS)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The list of transformer blocks: the first ModuleList of config.num_hidden_layers blocks of one class."""
    import torch

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        if len({type(block) for block in module}) == 1 and any(True for _ in module[0].parameters()):
            return path, module
    count = f"{n_layers} " if n_layers is not None else ""
    raise PipelineError(f"{_who(model)}: found no list of {count}transformer blocks in the model")


def d_model_of(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "embedding_dim", None):
        return int(embeddings.embedding_dim)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(text_config.hidden_size)


def _activation_candidates(model: torch.nn.Module, block: torch.nn.Module, mlp_path: str) -> list[str]:
    import torch

    found = []
    overridden = OVERRIDES.get(family_of(model), {}).get("activation")
    container = block.get_submodule(mlp_path) if mlp_path else block
    for name, module in container.named_children():
        if any(True for _ in module.parameters()) or isinstance(module, (torch.nn.Dropout, torch.nn.Identity)):
            continue
        if "dropout" in type(module).__name__.lower() or isinstance(module, torch.nn.ModuleList):
            continue
        if len(list(module.children())) == 0:
            found.append(f"module:{mlp_path + '.' if mlp_path else ''}{name}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    named = [getattr(config, key) for key in ACTIVATION_KEYS if isinstance(getattr(config, key, None), str)]
    from transformers.activations import ACT2FN

    names = ([overridden] if overridden else []) + [n for n in named if n in ACT2FN]
    return found + [f"config:{n}" for n in dict.fromkeys(names)]


def find_candidates(model: torch.nn.Module) -> Candidates:
    """Read the MLP's layout off the module tree (works on the meta device: no weights needed)."""
    blocks_path, blocks = find_blocks(model)
    block = blocks[0]
    d = d_model_of(model)
    family, who = family_of(model), _who(model)
    if family in UNSUPPORTED:
        raise PipelineError(f"{who}: not supported: {UNSUPPORTED[family]}")
    stacked = {name: tuple(p.shape) for name, p in block.named_parameters() if p.ndim == 3 and not _in_attention(name)}
    if stacked:
        return _expert_candidates(model, block, blocks_path, len(blocks), d, stacked)
    linears = {}
    for path, module in block.named_modules():
        shape = _linear_shape(module)
        if shape is not None and path and not _in_attention(path):
            linears[path] = shape
    outs = {p: s for p, s in linears.items() if s[1] == d and s[0] != d}
    if len(outs) != 1:
        what = ", ".join(f"{p} {s[0]}->{s[1]}" for p, s in linears.items()) or "none"
        raise PipelineError(
            f"{who}: cannot tell the MLP's output projection (one linear layer F -> d_model={d}) among the block's "
            f"linear layers outside attention: {what}"
        )
    (out_path, (n_neurons, _, conv1d)), = outs.items()
    ins = [p for p, s in linears.items() if s[0] == d and s[1] in (n_neurons, 2 * n_neurons) and p != out_path]
    plain = [p for p in ins if linears[p][1] == n_neurons]
    fused = [p for p in ins if linears[p][1] == 2 * n_neurons]
    override = OVERRIDES.get(family, {})
    if len(plain) == 1 and not fused:
        orderings: list[tuple[Projection, ...]] = [(Projection(plain[0]),)]
    elif len(plain) == 2 and not fused:
        a, b = plain
        named_gate = [p for p in plain if any(w in p.rsplit(".", 1)[-1].lower() for w in GATE_WORDS)]
        first = (Projection(a), Projection(b))
        second = (Projection(b), Projection(a))
        if override.get("gate_first") is False or (len(named_gate) == 1 and named_gate[0] == b):
            first, second = second, first
        orderings = [first, second]
    elif len(fused) == 1 and not plain:
        first = (Projection(fused[0], 0), Projection(fused[0], 1))
        second = (Projection(fused[0], 1), Projection(fused[0], 0))
        orderings = [second, first] if override.get("gate_first") is False else [first, second]
    else:
        what = ", ".join(f"{p} {linears[p][0]}->{linears[p][1]}" for p in ins) or "none"
        raise PipelineError(
            f"{who}: cannot tell the MLP's input projections (d_model={d} -> F={n_neurons}, or 2F when fused) "
            f"apart: {what}"
        )
    mlp_path = out_path.rsplit(".", 1)[0] if "." in out_path else ""
    activations = _activation_candidates(model, block, mlp_path)
    if not activations:
        raise PipelineError(f"{who}: found no activation module in {mlp_path or 'the block'} and no activation "
                            f"named in the config ({', '.join(ACTIVATION_KEYS)})")
    return Candidates(family, blocks_path, tuple(orderings), out_path, tuple(activations), conv1d, d, n_neurons,
                      len(blocks))


def _dense_subtree(block: torch.nn.Module, root: str, d: int, skip: str) -> tuple[tuple[str, ...], str, int] | None:
    """A dense gated or plain MLP under `root` (a shared expert): its input projections (gate first), output
    projection and width; None when there is none. Modules under `skip` (the experts) are left out."""
    container = block.get_submodule(root) if root else block
    linears = {}
    for path, module in container.named_modules():
        full = f"{root}.{path}" if root and path else (path or root)
        shape = _linear_shape(module)
        if shape is not None and path and not full.startswith(skip) and not _in_attention(full):
            linears[full] = shape
    outs = [(p, s) for p, s in linears.items() if s[1] == d and s[0] != d]
    if len(outs) != 1:
        return None
    out, (width, _, _) = outs[0]
    ins = sorted((p for p, s in linears.items() if s[0] == d and s[1] == width),
                 key=lambda p: not any(w in p.rsplit(".", 1)[-1].lower() for w in GATE_WORDS))
    return (tuple(ins), out, width) if 1 <= len(ins) <= 2 else None


def _expert_candidates(model, block, blocks_path: str, n_layers: int, d: int, stacked: dict[str, tuple[int, ...]]) -> Candidates:
    """A mixture of experts: 3-D parameters [E, rows, d_model] (gate_up fused or gate and up) and [E, d_model, F]."""
    family, who = family_of(model), _who(model)
    modules = {name.rsplit(".", 1)[0] for name in stacked}
    if len(modules) != 1:
        raise PipelineError(f"{who}: expert weights in several modules ({', '.join(sorted(modules))}): not supported")
    (module,) = modules
    downs = [n for n, s in stacked.items() if s[1] == d and s[2] != d]
    if len(downs) != 1:
        raise PipelineError(f"{who}: cannot tell the experts' output projection [E, d_model={d}, F] among "
                            f"{', '.join(f'{n} {list(s)}' for n, s in stacked.items())}")
    down = downs[0]
    n_experts, _, per_expert = stacked[down]
    fused = [n for n, s in stacked.items() if s == (n_experts, 2 * per_expert, d)]
    plain = [n for n, s in stacked.items() if s == (n_experts, per_expert, d)]
    if len(fused) == 1 and not plain:
        first = (Projection(fused[0], 0), Projection(fused[0], 1))
        orderings = [first, first[::-1]]
    elif len(plain) == 2 and not fused:
        a, b = sorted(plain, key=lambda p: not any(w in p.rsplit(".", 1)[-1].lower() for w in GATE_WORDS))
        orderings = [(Projection(a), Projection(b)), (Projection(b), Projection(a))]
    else:
        raise PipelineError(f"{who}: the experts' input projections are not [E, 2F, d_model] or two [E, F, d_model] "
                            f"(found {', '.join(f'{n} {list(s)}' for n, s in stacked.items())}); not supported")
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    shared = _dense_subtree(block, parent, d, module)
    experts = Experts(module, n_experts, per_expert, *(shared if shared else ((), "", 0)))
    activations = _activation_candidates(model, block, module)
    if not activations:
        raise PipelineError(f"{who}: found no activation module in {module} and no activation named in the config")
    return Candidates(family, blocks_path, tuple(orderings), down, tuple(activations), False, d, experts.n_units,
                      n_layers, experts)


class StopForward(Exception):
    """Raised from a hook once the last needed layer is captured: later layers and the LM head never run."""


@dataclass
class ModelAdapter:
    layout: MLPLayout
    _act_cache: dict = field(default_factory=dict, repr=False)

    def body(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model without its LM head (Hugging Face's base_model)."""
        return model.base_model

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layout.layers)  # type: ignore[return-value]

    def n_layers(self, model: torch.nn.Module) -> int:
        return len(self.blocks(model))

    def block(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return self.blocks(model)[layer]

    def projection_modules(self, model: torch.nn.Module, layer: int) -> list[torch.nn.Module]:
        """The distinct input projection modules (one for a fused gate_up), in layout order."""
        paths = list(dict.fromkeys(p.module for p in self.layout.projections))
        return [self.block(model, layer).get_submodule(p) for p in paths]

    def out_projection(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        if self.layout.experts is not None:
            raise PipelineError(f"{self.layout.family}: the experts of a mixture have no single output projection "
                                "module (an SAE cannot be spliced into this layer)")
        return self.block(model, layer).get_submodule(self.layout.out_proj)

    def d_model(self, model: torch.nn.Module) -> int:
        return d_model_of(model)

    def n_neurons(self, model: torch.nn.Module) -> int:
        if self.layout.experts is not None:
            return self.layout.experts.n_units
        shape = _linear_shape(self.out_projection(model, 0))
        assert shape is not None
        return shape[0]

    def input_weights(self, model: torch.nn.Module, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per input projection: (W [n_neurons, d_model], b [n_neurons]) in float32; b is zeros where there is none.
        For a mixture of experts, the units' rows: every expert's, expert-major, then the shared expert's."""
        block = self.block(model, layer)
        if self.layout.experts is not None:
            return expert_weights(self.layout, block)
        tensors = {}
        for path in dict.fromkeys(p.module for p in self.layout.projections):
            proj = block.get_submodule(path)
            bias = getattr(proj, "bias", None)
            tensors[path] = (proj.weight.detach(), bias.detach() if bias is not None else None)
        return split_projections(self.layout, tensors)

    def activation_fn(self, model: torch.nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return activation_callable(self.layout.activation, self.block(model, layer))

    def activation_from_pre(self, model: torch.nn.Module, layer: int, pre: list[torch.Tensor]) -> torch.Tensor:
        act = self.activation_fn(model, layer)(pre[0])
        return act * pre[1] if self.layout.gated else act

    def hook_names(self, layer: int) -> dict[str, str]:
        names = {"in": f"blocks.{layer}.mlp.hook_in", "post": f"blocks.{layer}.mlp.hook_post"}
        names.update({f"pre.{p}": f"blocks.{layer}.mlp.hook_pre.{p}" for p in self.layout.projection_names})
        return names

    def tensor_names(self, layer: int) -> dict[str, tuple[str, str]]:
        """Per distinct projection module: the state-dict names of its weight and bias in a saved checkpoint (none
        for a mixture of experts, whose checkpoints store each expert separately under names of their own)."""
        if self.layout.experts is not None:
            return {}
        prefix = f"{self.layout.layers}.{layer}"
        return {
            p.module: (f"{prefix}.{p.module}.weight", f"{prefix}.{p.module}.bias")
            for p in self.layout.projections
        }


def split_projections(
    layout: MLPLayout, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W [F, d], b [F]) per projection of the layout from each module's (weight, bias), halves of fused ones cut."""
    out = []
    for proj in layout.projections:
        weight, bias = tensors[proj.module]
        weight = weight.float()
        weight = weight.T if layout.conv1d else weight
        bias = bias.float() if bias is not None else weight.new_zeros(weight.shape[0])
        if proj.half is not None:
            rows = weight.shape[0] // 2
            cut = slice(proj.half * rows, (proj.half + 1) * rows)
            weight, bias = weight[cut], bias[cut]
        out.append((weight.contiguous(), bias.contiguous()))
    return out


def expert_weights(layout: MLPLayout, block: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch

    experts = layout.experts
    assert experts is not None
    out = []
    for i, proj in enumerate(layout.projections):
        stacked = block.get_parameter(proj.module).detach().float()  # [E, rows, d]
        if proj.half is not None:
            stacked = stacked[:, proj.half * experts.per_expert : (proj.half + 1) * experts.per_expert]
        weight = stacked.reshape(-1, stacked.shape[-1])
        bias = weight.new_zeros(weight.shape[0])
        if experts.shared:
            module = block.get_submodule(experts.shared[i if len(experts.shared) == 2 else 0])
            shared_bias = getattr(module, "bias", None)
            weight = torch.cat([weight, module.weight.detach().float()])
            bias = torch.cat([bias, shared_bias.detach().float() if shared_bias is not None
                              else bias.new_zeros(experts.shared_neurons)])
        out.append((weight.contiguous(), bias.contiguous()))
    return out


def activation_callable(descriptor: str, block: torch.nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor]:
    kind, name = descriptor.split(":", 1)
    if kind == "module":
        assert block is not None
        return block.get_submodule(name)
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class MLPCapture:
    """Forward hooks that record, per requested layer, x, the pre-activations and the activation of a batch.

    `captured[layer]` holds {"x": [B, T, d], "pre": [[B, T, N], ...], "act": [B, T, N]} after a forward pass.
    With stop_after_last, the hook of the deepest requested layer raises StopForward, so nothing past it runs.
    Some families (OPT) flatten the tokens to [B*T, d] inside the block; a hook on the body records B and T, so
    every captured tensor is [B, T, ...] whatever the family does.
    """

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], stop_after_last: bool):
        self.captured: dict[int, dict] = {layer: {} for layer in layers}
        self._tokens_shape: tuple[int, int] = (0, 0)
        layout = adapter.layout
        self._handles = [adapter.body(model).register_forward_pre_hook(self._record_shape, with_kwargs=True)]
        last = max(layers)
        if layout.experts is not None:
            for layer in layers:
                module = adapter.block(model, layer).get_submodule(layout.experts.module)
                hook = self._experts_hook(self.captured[layer], adapter, model, layer, stop_after_last and layer == last)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            return
        for layer in layers:
            slot = self.captured[layer]
            slot["pre"] = [None] * len(layout.projections)
            modules = adapter.projection_modules(model, layer)
            self._handles.append(modules[0].register_forward_pre_hook(self._store_input(slot, "x"), with_kwargs=True))
            paths = list(dict.fromkeys(p.module for p in layout.projections))
            for path, module in zip(paths, modules):
                targets = [(i, p.half) for i, p in enumerate(layout.projections) if p.module == path]
                self._handles.append(module.register_forward_hook(self._store_pre(slot, targets)))
            out = adapter.out_projection(model, layer)
            stop = stop_after_last and layer == last
            self._handles.append(out.register_forward_pre_hook(self._store_input(slot, "act", stop), with_kwargs=True))

    def _record_shape(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self._tokens_shape = (int(ids.shape[0]), int(ids.shape[1]))

    def _tokens_first(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self._tokens_shape, t.shape[-1]) if t.ndim == 2 else t

    def _store_input(self, slot: dict, key: str, stop: bool = False):
        def hook(_module, args, kwargs):
            slot[key] = self._tokens_first((args[0] if args else next(iter(kwargs.values()))).detach())
            if stop:
                raise StopForward

        return hook

    def _experts_hook(self, slot: dict, adapter: ModelAdapter, model: torch.nn.Module, layer: int, stop: bool):
        """A mixture of experts: every unit's pre-activations and activation computed from x and the stacked
        weights (the experts' own forward computes only the routed ones). `unit_valid` marks where the router sent
        the token to the unit's expert; elsewhere the activation is 0, what the unit contributes there."""
        import torch

        experts = adapter.layout.experts
        assert experts is not None
        weights = adapter.input_weights(model, layer)
        act_fn = adapter.activation_fn(model, layer)

        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            route = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            x = x.detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            pre = [flat @ w.to(flat.device).T + b.to(flat.device) for w, b in weights]
            act = act_fn(pre[0]) * pre[1]
            routed = torch.zeros(flat.shape[0], experts.n_experts + 1, dtype=torch.bool, device=flat.device)
            routed.scatter_(1, index.reshape(flat.shape[0], -1).long().clamp(0, experts.n_experts), True)
            valid = routed[:, : experts.n_experts].repeat_interleave(experts.per_expert, dim=1)
            if experts.shared_neurons:
                valid = torch.cat([valid, valid.new_ones(flat.shape[0], experts.shared_neurons)], dim=1)
            act = torch.where(valid, act, torch.zeros_like(act))
            slot["x"] = self._tokens_first(x)
            slot["pre"] = [self._tokens_first(p) for p in pre]
            slot["act"] = self._tokens_first(act)
            slot["unit_valid"] = self._tokens_first(valid)
            slot["route"] = (index.detach(), route.detach() if route is not None else None)
            if stop:
                raise StopForward

        return hook

    def _store_pre(self, slot: dict, targets: list[tuple[int, int | None]]):
        def hook(_module, _args, output):
            output = self._tokens_first(output.detach())
            for index, half in targets:
                if half is None:
                    slot["pre"][index] = output
                else:
                    rows = output.shape[-1] // 2
                    slot["pre"][index] = output[..., half * rows : (half + 1) * rows]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MLPCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def run_capture(body: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """Run the model body for its hooks' sake; StopForward ends it early on purpose."""
    try:
        body(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass


@dataclass(frozen=True)
class Verification:
    layout: MLPLayout
    pre_error: float  # worst relative error of x . w + b against the model's pre-activations
    act_error: float  # worst relative error of act(pre) against the model's activation
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"pre_error": self.pre_error, "act_error": self.act_error, "tokens": self.tokens}


def verification_ids(model: torch.nn.Module, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random token ids, no longer than the model's positions."""
    import torch

    vocab = int(model.get_input_embeddings().num_embeddings)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = next((getattr(text_config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(text_config, k, None), int)), None)
    length = min(length, positions) if positions else length
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, vocab), (batch, max(2, length)), generator=generator)


def _check_finite(model: torch.nn.Module, layer: int, tensors: list[torch.Tensor]) -> None:
    import torch

    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise PipelineError(f"{_who(model)}: layer {layer}: the MLP computes NaN or inf on the verification batch "
                            "(broken weights, or overflow in the model's dtype)")


def _verification_forward(model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], ids: torch.Tensor,
                          stop_after_last: bool = True) -> dict[int, dict]:
    """One forward pass of the verification batch with the capture hooks; a failing forward is a one-line error."""
    import torch

    try:
        with MLPCapture(model, adapter, layers, stop_after_last) as capture, torch.inference_mode():
            run_capture(adapter.body(model), ids.to(next(model.parameters()).device))
    except Exception as exc:  # the model's own forward failed on a plain batch of token ids
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{_who(model)}: the verification forward pass failed: {first}") from None
    return capture.captured


def _check_causal(model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], input_ids: torch.Tensor,
                  dtype: str) -> dict[int, dict]:
    """Caching pads on the right with no attention mask, which is exact only under causal attention: a later
    token must never change an earlier position. Returns the captures of the unchanged batch."""
    first = _verification_forward(model, adapter, layers, input_ids)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % int(model.get_input_embeddings().num_embeddings)
    second = _verification_forward(model, adapter, layers, changed)
    for layer in layers:
        before, after = first[layer].get("act"), second[layer].get("act")
        if before is None or after is None:
            continue
        drift = float(((before[:, :-1].double() - after[:, :-1].double()).abs() / (1.0 + before[:, :-1].double().abs())).max())
        if drift > ACT_TOLERANCE[dtype]:
            raise PipelineError(
                f"{_who(model)}: layer {layer}: changing the last token changed the MLP's activations at earlier "
                f"positions by {drift:.1e}: attention is not causal, and the method needs a decoder-only model"
            )
    return first


def _verify_experts(model: torch.nn.Module, candidates: Candidates, input_ids: torch.Tensor, dtype: str) -> Verification:
    """A mixture of experts: the units' activations, computed from x and the stacked weights, must rebuild what
    the experts module returns (sum over the routed experts of weight x down_proj(activation)), and the shared
    expert's part must equal its output projection's input."""
    import torch

    experts = candidates.experts
    assert experts is not None
    layers = list(range(candidates.n_layers))
    best: tuple[float, int, MLPLayout] | None = None
    for layout in candidates.layouts():
        adapter = ModelAdapter(layout)
        outputs: dict[int, torch.Tensor] = {}
        shared_in: dict[int, torch.Tensor] = {}
        handles = []
        for layer in layers:
            block = adapter.block(model, layer)
            handles.append(block.get_submodule(experts.module).register_forward_hook(
                lambda _m, _a, out, layer=layer: outputs.__setitem__(layer, out.detach())))
            if experts.shared_out:
                handles.append(block.get_submodule(experts.shared_out).register_forward_pre_hook(
                    lambda _m, args, layer=layer: shared_in.__setitem__(layer, args[0].detach())))
        try:
            captured = _verification_forward(model, adapter, layers, input_ids, stop_after_last=False)
        finally:
            for handle in handles:
                handle.remove()
        worst, at = 0.0, 0
        for layer in layers:
            slot = captured[layer]
            _check_finite(model, layer, [slot["x"], outputs[layer]])
            act = slot["act"].reshape(-1, experts.n_units).double()
            index, route = slot["route"]
            down = adapter.block(model, layer).get_parameter(layout.out_proj).detach().double()  # [E, d, F]
            rebuilt = torch.zeros_like(outputs[layer].reshape(act.shape[0], -1), dtype=torch.float64)
            for j in range(index.shape[-1]):
                e = index.reshape(act.shape[0], -1)[:, j].long()
                ok = e < experts.n_experts
                cols = e.clamp(max=experts.n_experts - 1)[:, None] * experts.per_expert + torch.arange(experts.per_expert, device=e.device)
                a = torch.gather(act, 1, cols)  # [T, F]: this token's activations in its j-th expert
                w = route.reshape(act.shape[0], -1)[:, j].double() if route is not None else torch.ones_like(a[:, 0])
                part = torch.einsum("tf,tdf->td", a, down[e.clamp(max=experts.n_experts - 1)])
                rebuilt += torch.where(ok[:, None], w[:, None] * part, torch.zeros_like(part))
            # relative to the largest value: a random model's outputs are small, where |a - b| / (1 + |b|) would
            # let a wrong activation through
            ref = outputs[layer].reshape(rebuilt.shape).double()
            err = float((rebuilt - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            if experts.shared_out:
                mine = act[:, experts.n_experts * experts.per_expert :]
                theirs = shared_in[layer].reshape(mine.shape).double()
                err = max(err, float((mine - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12)))
            if not err <= worst:
                worst, at = err, layer
        if worst <= PRE_TOLERANCE[dtype]:
            _check_causal(model, adapter, layers, input_ids, dtype)
            return Verification(layout, 0.0, worst, int(input_ids.numel()))
        if best is None or worst < best[0]:
            best = (worst, at, layout)
    assert best is not None
    raise PipelineError(
        f"{_who(model)}: layer {best[1]}: no reading of the experts reproduces their output: the closest "
        f"({best[2].describe_activation()} over {', '.join(best[2].projection_names)}) is off by {best[0]:.1e} "
        f"(relative; tolerance {PRE_TOLERANCE[dtype]:.0e})"
    )


def verify(model: torch.nn.Module, candidates: Candidates, input_ids: torch.Tensor, dtype: str = "float32") -> Verification:
    """Run one real batch and keep the first candidate layout that reproduces every layer's pre-activations from
    x and the extracted weights, and its activation from those; else a one-line error with the mismatch."""
    import torch

    if candidates.experts is not None:
        return _verify_experts(model, candidates, input_ids, dtype)
    layouts = list(candidates.layouts())
    adapter = ModelAdapter(layouts[0])
    layers = list(range(candidates.n_layers))
    captured = _check_causal(model, adapter, layers, input_ids, dtype)
    worst_pre, where_pre = 0.0, 0
    for layer in layers:
        slot = captured[layer]
        if slot.get("x") is None or slot.get("act") is None or any(p is None for p in slot["pre"]):
            raise PipelineError(f"{_who(model)}: layer {layer}: the MLP's projections did not run in a forward pass "
                                f"(its forward does not call {candidates.out_proj} as a module)")
        _check_finite(model, layer, [slot["x"], slot["act"], *slot["pre"]])
        x = slot["x"].double().reshape(-1, slot["x"].shape[-1])
        for (weight, bias), pre in zip(adapter.input_weights(model, layer), slot["pre"]):
            w = weight.double()
            recomputed = x @ w.T + bias.double()
            scale = 1.0 + x.abs() @ w.abs().T
            err = float(((recomputed - pre.double().reshape(recomputed.shape)).abs() / scale).max())
            if err > worst_pre:
                worst_pre, where_pre = err, layer
    if not worst_pre <= PRE_TOLERANCE[dtype]:
        raise PipelineError(
            f"{_who(model)}: layer {where_pre}: x . w + b recomputed from the MLP input and the weights of "
            f"{', '.join(layouts[0].projection_names)} differs from the model's pre-activation by {worst_pre:.1e} "
            f"(relative; tolerance {PRE_TOLERANCE[dtype]:.0e})"
        )
    best: tuple[float, int, MLPLayout] | None = None
    for layout in layouts:
        order = [layouts[0].projections.index(p) for p in layout.projections]
        worst, at = 0.0, 0
        for layer in layers:
            slot = captured[layer]
            pre = [slot["pre"][i] for i in order]
            fn = activation_callable(layout.activation, adapter.block(model, layer))
            with torch.inference_mode():
                act = fn(pre[0]) * pre[1] if layout.gated else fn(pre[0])
            post = slot["act"].double()
            err = float((act.double() - post).abs().max() / post.abs().max().clamp(min=1e-12))
            if not err <= worst:
                worst, at = err, layer
        if worst <= ACT_TOLERANCE[dtype]:
            return Verification(layout, worst_pre, worst, int(input_ids.numel()))
        if best is None or worst < best[0]:
            best = (worst, at, layout)
    assert best is not None
    tried = "; ".join(f"{l.describe_activation()} over {', '.join(l.projection_names)}" for l in layouts)
    raise PipelineError(
        f"{_who(model)}: layer {best[1]}: no reading of the MLP reproduces its activation: the closest "
        f"({best[2].describe_activation()}) is off by {best[0]:.1e} (relative; tolerance {ACT_TOLERANCE[dtype]:.0e}); "
        f"tried {tried}"
    )


def adapter_for(model: torch.nn.Module, layout: MLPLayout | None = None) -> ModelAdapter:
    """The adapter of a loaded model: from its verified layout (the prepared model's manifest), or found and
    verified now on one small batch."""
    if layout is None:
        layout = getattr(model, "_neuron_embeddings_layout", None)
    if layout is None:
        candidates = find_candidates(model)
        layout = verify(model, candidates, verification_ids(model)).layout
    model._neuron_embeddings_layout = layout  # type: ignore[assignment]
    return ModelAdapter(layout)
