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
# |act(pre) - post| / (1 + |post|). float32 accumulation is ~1e-7 per term; a wrong activation (tanh GELU for erf
# GELU, say) is off by ~1e-4, so the activation check is strict enough to tell such variants apart.
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
class MLPLayout:
    """Where one model's MLPs are: written to the prepared model's manifest, read by every later stage."""

    family: str  # model_type
    layers: str  # dotted path of the list of blocks, relative to the model
    projections: tuple[Projection, ...]  # input projections, gate first for a gated MLP
    out_proj: str  # relative to the block; its input is the activation
    activation: str  # "module:<path relative to the block>" or "config:<ACT2FN name>"
    conv1d: bool  # GPT-2's Conv1D stores weights as [d_in, d_out]; nn.Linear as [d_out, d_in]

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
        return cls(**{**data, "projections": tuple(Projection(**p) for p in data["projections"])})


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

    def layouts(self) -> Iterator[MLPLayout]:
        for order, act in itertools.product(self.orderings, self.activations):
            yield MLPLayout(self.family, self.layers, order, self.out_proj, act, self.conv1d)


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
    experts = [
        name for name, p in block.named_parameters() if p.ndim == 3 and not _in_attention(name)
    ]
    if experts:
        raise PipelineError(
            f"{who}: layer 0's MLP is a mixture of experts ({experts[0]} holds every expert's weights); experts "
            "as units are not supported yet"
        )
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
        return self.block(model, layer).get_submodule(self.layout.out_proj)

    def d_model(self, model: torch.nn.Module) -> int:
        return d_model_of(model)

    def n_neurons(self, model: torch.nn.Module) -> int:
        shape = _linear_shape(self.out_projection(model, 0))
        assert shape is not None
        return shape[0]

    def input_weights(self, model: torch.nn.Module, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per input projection: (W [n_neurons, d_model], b [n_neurons]) in float32; b is zeros where there is none."""
        block = self.block(model, layer)
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
        """Per distinct projection module: the state-dict names of its weight and bias in a saved checkpoint."""
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


def verify(model: torch.nn.Module, candidates: Candidates, input_ids: torch.Tensor, dtype: str = "float32") -> Verification:
    """Run one real batch and keep the first candidate layout that reproduces every layer's pre-activations from
    x and the extracted weights, and its activation from those; else a one-line error with the mismatch."""
    import torch

    layouts = list(candidates.layouts())
    adapter = ModelAdapter(layouts[0])
    layers = list(range(candidates.n_layers))
    device = next(model.parameters()).device
    try:
        with MLPCapture(model, adapter, layers, stop_after_last=True) as capture, torch.inference_mode():
            run_capture(adapter.body(model), input_ids.to(device))
    except Exception as exc:  # the model's own forward failed on a plain batch of token ids
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{_who(model)}: the verification forward pass failed: {first}") from None
    # Caching pads on the right with no attention mask, which is exact only under causal attention: a later
    # token must never change an earlier position.
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % int(model.get_input_embeddings().num_embeddings)
    with MLPCapture(model, adapter, layers, stop_after_last=True) as later, torch.inference_mode():
        run_capture(adapter.body(model), changed.to(device))
    for layer in layers:
        before, after = capture.captured[layer].get("act"), later.captured[layer].get("act")
        if before is None or after is None:
            continue
        drift = float(((before[:, :-1].double() - after[:, :-1].double()).abs() / (1.0 + before[:, :-1].double().abs())).max())
        if drift > ACT_TOLERANCE[dtype]:
            raise PipelineError(
                f"{_who(model)}: layer {layer}: changing the last token changed the MLP's activations at earlier "
                f"positions by {drift:.1e}: attention is not causal, and the method needs a decoder-only model"
            )
    worst_pre, where_pre = 0.0, 0
    for layer in layers:
        slot = capture.captured[layer]
        if slot.get("x") is None or slot.get("act") is None or any(p is None for p in slot["pre"]):
            raise PipelineError(f"{_who(model)}: layer {layer}: the MLP's projections did not run in a forward pass "
                                f"(its forward does not call {candidates.out_proj} as a module)")
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
            slot = capture.captured[layer]
            pre = [slot["pre"][i] for i in order]
            fn = activation_callable(layout.activation, adapter.block(model, layer))
            with torch.inference_mode():
                act = fn(pre[0]) * pre[1] if layout.gated else fn(pre[0])
            post = slot["act"].double()
            err = float(((act.double() - post).abs() / (1.0 + post.abs())).max())
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
