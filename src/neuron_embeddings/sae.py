"""Sparse autoencoders (SAEs) on a layer's MLP activations, and their latents as units of the neuron-embedding method.

An SAE reads h, the layer's MLP activations (`blocks.{L}.mlp.hook_post`: the neuron activations, the input of the
output projection), and writes a reconstruction of it:

    x   = h - b_dec                       (the SAE's input, "h minus the decoder bias"; SAELens apply_b_dec_to_input)
    pre = x @ W_enc + b_enc               (latent pre-activations; W_enc [d_in, d_sae])
    f   = act(pre)                        (ReLU; TopK: the k largest per token, ReLU'd; JumpReLU: pre where pre > theta)
    h^  = f @ W_dec + b_dec               (W_dec [d_sae, d_in], rows of unit norm for the SAEs trained here)

A latent is a unit exactly like a neuron: its MLP input is x, its input weights W_enc[:, f], its bias b_enc[f], so
its embedding at an example is x * W_enc[:, f] and sum(embedding) + b_enc[f] is the latent's pre-activation. The
selection, embedding, clustering and metrics code of the neurons runs unchanged on latents (`cache_sae_shard`
feeds the same accumulators; `unit_weights` replaces the model's input weights).

Trained here (`train_sae`): a ReLU SAE with an L1 penalty and unit-norm decoder rows (Bricken et al. 2023,
"Towards Monosemanticity"), and a TopK SAE (Gao et al. 2024). Saved and loaded in the SAELens layout
(`cfg.json` + `sae_weights.safetensors`), so external SAEs load the same way (`load_sae`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import PipelineError

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# Our architecture names -> SAELens's ("standard" is SAELens's ReLU SAE).
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
ARCHITECTURES = tuple(SAELENS_ARCHITECTURE)


def hook_name(layer: int) -> str:
    """The hook point an SAE here reads (TransformerLens's name, as adapters.py uses it)."""
    return f"blocks.{layer}.mlp.hook_post"


@dataclass
class SparseAutoencoder:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "relu"  # relu | topk | jumprelu
    k: int | None = None  # topk: latents kept per token
    threshold: torch.Tensor | None = None  # jumprelu: per-latent threshold theta
    apply_b_dec_to_input: bool = True
    layer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise PipelineError(f"sae: architecture '{self.architecture}' is not one of {', '.join(ARCHITECTURES)}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc.shape, (d_sae,)), "W_dec": (self.W_dec.shape, (d_sae, d_in)),
                  "b_dec": (self.b_dec.shape, (d_in,))}
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise PipelineError(f"sae: {name} has shape {tuple(got)}, expected {want} (W_enc is [d_in, d_sae])")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise PipelineError(f"sae: a topk SAE needs k in 1..{d_sae}, got {self.k}")
        if self.architecture == "jumprelu" and (self.threshold is None or tuple(self.threshold.shape) != (d_sae,)):
            raise PipelineError("sae: a jumprelu SAE needs a threshold tensor of shape [d_sae]")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: torch.device | str) -> "SparseAutoencoder":
        moved = {name: getattr(self, name).to(device) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        threshold = self.threshold.to(device) if self.threshold is not None else None
        return SparseAutoencoder(**moved, architecture=self.architecture, k=self.k, threshold=threshold,
                                 apply_b_dec_to_input=self.apply_b_dec_to_input, layer=self.layer, meta=self.meta)

    def sae_input(self, h: torch.Tensor) -> torch.Tensor:
        """x, what the encoder reads: h - b_dec (or h itself for an SAE saved with apply_b_dec_to_input false)."""
        h = h.to(self.W_enc.dtype)
        return h - self.b_dec if self.apply_b_dec_to_input else h

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "topk":
            top = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(self.sae_input(h)))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(h)).to(h.dtype)

    def unit_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The latents' input weights in the layout of adapters.ModelAdapter.input_weights: one 'projection',
        (W [d_sae, d_in], b [d_sae]), so that embedding = x * W[f] and sum + b[f] = pre-activation."""
        return [(self.W_enc.T.float().contiguous().cpu(), self.b_enc.float().cpu())]


# ---------------------------------------------------------------------------------------------------------------
# The SAELens layout: a folder with cfg.json and sae_weights.safetensors.


def _cfg_value(cfg: dict[str, Any], key: str) -> Any:
    """A key at the top level (SAELens <= 5) or under metadata/meta (SAELens 6)."""
    if key in cfg:
        return cfg[key]
    for nested in ("metadata", "meta"):
        if isinstance(cfg.get(nested), dict) and key in cfg[nested]:
            return cfg[nested][key]
    return None


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE saved in the SAELens layout (ours or SAELens's own `save_model`), as float32 tensors.

    Supported: architecture standard (ReLU), topk (k from `k` or activation_fn_kwargs), jumprelu; inputs not
    normalised (normalize_activations none). Anything else stops with an error naming the key.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise PipelineError(f"{folder}: not an SAE in the SAELens layout ({path.name} missing)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{cfg_path}: not valid JSON ({exc})") from None
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise PipelineError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in weights]
    if missing:
        raise PipelineError(f"{weights_path}: tensors {', '.join(missing)} missing (SAELens names W_enc, b_enc, W_dec, b_dec)")
    saelens_arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    ours = {v: k for k, v in SAELENS_ARCHITECTURE.items()}.get(saelens_arch)
    if ours is None:
        raise PipelineError(f"{cfg_path}: architecture '{saelens_arch}' is not supported (standard, topk, jumprelu)")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none":
        raise PipelineError(
            f"{cfg_path}: normalize_activations '{normalize}' is not supported; fold the scaling into the weights "
            "first (SAELens: fold_activation_norm_scaling_factor) and save with normalize_activations none"
        )
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    layer = _cfg_value(cfg, "hook_layer")
    sae = SparseAutoencoder(
        W_enc=weights["W_enc"].float(), b_enc=weights["b_enc"].float(),
        W_dec=weights["W_dec"].float(), b_dec=weights["b_dec"].float(),
        architecture=ours, k=int(k) if k is not None else None,
        threshold=weights["threshold"].float() if "threshold" in weights else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        layer=int(layer) if layer is not None else None,
        meta={"hook_name": _cfg_value(cfg, "hook_name"), "model_name": _cfg_value(cfg, "model_name"),
              "neuron_embeddings": cfg.get("neuron_embeddings")},
    )
    if cfg.get("d_in") not in (None, sae.d_in) or cfg.get("d_sae") not in (None, sae.d_sae):
        raise PipelineError(f"{cfg_path}: d_in/d_sae ({cfg.get('d_in')}, {cfg.get('d_sae')}) do not match the weights "
                            f"({sae.d_in}, {sae.d_sae})")
    return sae.to(device)


def check_fits(sae: SparseAutoencoder, layer: int, n_neurons: int, where: str) -> None:
    """An SAE the pipeline uses as units of a layer must read that layer's MLP activations."""
    if sae.d_in != n_neurons:
        raise PipelineError(f"{where}: the SAE reads {sae.d_in} inputs, but layer {layer}'s MLP has {n_neurons} "
                            "neurons (SAEs here read the MLP activations, blocks.L.mlp.hook_post)")
    name = sae.meta.get("hook_name")
    if name and not str(name).endswith("mlp.hook_post"):
        raise PipelineError(f"{where}: the SAE was trained on '{name}'; SAEs here read the MLP activations "
                            f"({hook_name(layer)})")
    if name and sae.layer is not None and sae.layer != layer:
        raise PipelineError(f"{where}: the SAE was trained on layer {sae.layer}, the config gives layer {layer}")


def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike, provenance: dict[str, Any] | None = None,
             model_name: str | None = None, context_size: int | None = None) -> None:
    """Write cfg.json and sae_weights.safetensors (SAELens layout, readable by SAELens's load_from_disk), each file
    atomically. The weights file carries our provenance in its header metadata, like every other tensor file."""
    from .storage import atomic_path, save_tensors

    folder = Path(folder)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_tensors({k: v.detach().float().cpu().numpy() for k, v in tensors.items()}, folder / WEIGHTS_FILE,
                 provenance or {})
    metadata = {"model_name": model_name, "hook_name": hook_name(sae.layer) if sae.layer is not None else None,
                "hook_layer": sae.layer, "hook_head_index": None, "prepend_bos": True, "context_size": context_size}
    cfg = {
        "architecture": SAELENS_ARCHITECTURE[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": sae.k} if sae.architecture == "topk" else {}),
        # SAELens >= 6 reads these under metadata, older versions at the top level.
        "metadata": metadata,
        **{key: metadata[key] for key in ("model_name", "hook_name", "hook_layer")},
        "activation_fn_str": "topk" if sae.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.k} if sae.architecture == "topk" else {},
        "neuron_embeddings": provenance or {},
    }
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Training.


@dataclass(frozen=True)
class TrainSettings:
    architecture: str = "topk"  # relu (L1 penalty, Bricken et al.) or topk (Gao et al.)
    expansion: int = 4  # d_sae = expansion x d_in (the MLP's neurons)
    k: int = 32  # topk: latents active per token
    l1_coefficient: float = 1.0  # relu: weight of sum_f f (decoder rows have unit norm), on normalised inputs
    lr: float = 1e-3  # Adam
    batch_size: int = 1024  # tokens per optimiser step
    epochs: int = 1  # passes over each buffer of streamed activations
    buffer_tokens: int = 65536  # activations held and shuffled at once
    train_tokens: int | None = None  # stop after this many streamed tokens (None: the whole corpus but eval)
    eval_tokens: int = 4096  # held out from training: quality figures are measured on these
    warmup_fraction: float = 0.05  # of the steps: lr (and the L1 coefficient) ramp up linearly
    aux_k_coefficient: float = 1 / 32  # topk: weight of the AuxK loss that revives dead latents (Gao et al.)
    dead_after_tokens: int = 20000  # topk AuxK: a latent silent for this many training tokens counts as dead
    seed: int = 0

    def check(self) -> None:
        if self.architecture not in ("relu", "topk"):
            raise PipelineError(f"sae.architecture: can train relu or topk, not '{self.architecture}'")


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)


class _Trainer:
    """The SAE's parameters during training, on normalised inputs h / scale (scale fixed from the first buffer
    so that E|h|^2 = d_in, as SAELens's expected_average_only_in); folded back out when training ends."""

    def __init__(self, d_in: int, settings: TrainSettings, device: torch.device, first: torch.Tensor):
        self.s = settings
        gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        d_sae = settings.expansion * d_in
        self.scale = float((first.float().pow(2).sum(1).mean() / d_in).sqrt().clamp_min(1e-8))
        w_dec = _unit_rows(torch.randn(d_sae, d_in, generator=gen))
        self.W_enc = w_dec.T.contiguous().to(device).requires_grad_()
        self.W_dec = w_dec.clone().to(device).requires_grad_()
        self.b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
        self.b_dec = (first.float().mean(0) / self.scale).to(device).requires_grad_()
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=settings.lr)
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.step_count = 0

    def _decode_topk(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k largest pre-activations per row, ReLU'd, and their decoding: a sparse sum of k decoder rows
        (embedding_bag), about 100x fewer multiply-adds than the dense product with all d_sae rows."""
        top = torch.topk(pre, k, dim=-1)
        values = torch.relu(top.values)
        recon = torch.nn.functional.embedding_bag(top.indices, self.W_dec, per_sample_weights=values, mode="sum")
        return recon, top.indices, values

    def step(self, h: torch.Tensor, total_steps: int) -> dict[str, float]:
        s = self.s
        x = h.float() / self.scale
        ramp = min(1.0, (self.step_count + 1) / max(1, s.warmup_fraction * total_steps))
        for group in self.opt.param_groups:
            group["lr"] = s.lr * ramp
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if s.architecture == "relu":
            f = torch.relu(pre)
            recon = f @ self.W_dec + self.b_dec
            active = f.detach() > 0
        else:
            decoded, index, values = self._decode_topk(pre, s.k)
            recon = decoded + self.b_dec
            active = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, index, values.detach() > 0)
        mse = (recon - x).pow(2).sum(-1).mean()
        loss = mse
        stats = {"mse": mse.item(), "var": (x - x.mean(0)).pow(2).sum(-1).mean().item()}
        if s.architecture == "relu":
            l1 = f.sum(-1).mean()  # decoder rows have unit norm, so this is Bricken et al.'s sum_f f |W_dec,f|
            loss = loss + s.l1_coefficient * ramp * l1
            stats["l1"] = l1.item()
        self.since_fired = torch.where(active.any(0), 0, self.since_fired + x.shape[0])
        if s.architecture == "topk" and s.aux_k_coefficient > 0:
            dead = self.since_fired >= s.dead_after_tokens
            n_dead = int(dead.sum())
            if n_dead:
                # AuxK (Gao et al.): the top dead latents reconstruct what the live ones missed.
                k_aux = min(x.shape[1] // 2, n_dead)
                aux, _, _ = self._decode_topk(torch.where(dead[None], pre, torch.full_like(pre, -torch.inf)), k_aux)
                aux_loss = (aux - (x - recon).detach()).pow(2).sum(-1).mean()
                loss = loss + s.aux_k_coefficient * min(n_dead / k_aux, 1.0) * aux_loss
                stats["aux"] = aux_loss.item()
        stats["l0"] = active.sum(-1).float().mean().item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Keep decoder rows on the unit sphere: drop the gradient along each row, step, renormalise.
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec
        self.opt.step()
        with torch.no_grad():
            self.W_dec.copy_(_unit_rows(self.W_dec))
        self.step_count += 1
        return stats

    def result(self, layer: int | None) -> SparseAutoencoder:
        """Fold the input scale out: on raw h the latents are scale x the trained ones, W_dec keeps unit rows."""
        with torch.no_grad():
            return SparseAutoencoder(
                W_enc=self.W_enc.detach().clone().cpu(), b_enc=(self.b_enc * self.scale).detach().cpu(),
                W_dec=self.W_dec.detach().clone().cpu(), b_dec=(self.b_dec * self.scale).detach().cpu(),
                architecture=self.s.architecture, k=self.s.k if self.s.architecture == "topk" else None, layer=layer,
            )


class SAETraining:
    """Training fed buffer by buffer: each buffer ([n, d_in] activations) is shuffled (seeded) and passed over
    `epochs` times in batches of `batch_size` tokens. `expected_tokens` (the stream's length) sets the warm-up."""

    def __init__(self, d_in: int, settings: TrainSettings, device: torch.device, expected_tokens: int,
                 layer: int | None = None):
        settings.check()
        torch.manual_seed(settings.seed)
        self.d_in, self.s, self.device, self.layer = d_in, settings, device, layer
        self.gen = torch.Generator(device="cpu").manual_seed(settings.seed + 1)
        self.total_steps = max(1, settings.epochs * math.ceil(expected_tokens / settings.batch_size))
        self.trainer: _Trainer | None = None
        self.seen = 0
        self.curve: list[dict[str, float]] = []
        self._window: list[dict[str, float]] = []

    def train_buffer(self, buffer: torch.Tensor) -> None:
        if buffer.shape[0] == 0:
            return
        buffer = buffer.to(self.device, torch.float32)
        if self.trainer is None:
            self.trainer = _Trainer(self.d_in, self.s, self.device, buffer)
        self.seen += buffer.shape[0]
        for _ in range(self.s.epochs):
            order = torch.randperm(buffer.shape[0], generator=self.gen).to(self.device)
            for start in range(0, buffer.shape[0], self.s.batch_size):
                self._window.append(self.trainer.step(buffer[order[start : start + self.s.batch_size]], self.total_steps))
                if len(self._window) == 20:
                    self.curve.append(_summarise(self._window, self.trainer.step_count))
                    self._window = []

    def finish(self) -> tuple[SparseAutoencoder, dict[str, Any]]:
        if self.trainer is None:
            raise PipelineError("sae: no activations to train on (is the corpus empty, or all held out?)")
        if self._window:
            self.curve.append(_summarise(self._window, self.trainer.step_count))
            self._window = []
        final = self.curve[-1]
        log.info("sae trained: %d steps over %d tokens; last steps: fve %.3f, l0 %.1f", self.trainer.step_count,
                 self.seen, final["fve"], final["l0"])
        info = {"steps": self.trainer.step_count, "tokens": self.seen, "input_scale": self.trainer.scale,
                "curve": self.curve}
        return self.trainer.result(self.layer), info


def train_on_buffers(buffers: Iterator[torch.Tensor], d_in: int, settings: TrainSettings, device: torch.device,
                     expected_tokens: int, layer: int | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train on an iterable of activation buffers ([n, d_in] each)."""
    training = SAETraining(d_in, settings, device, expected_tokens, layer)
    for buffer in buffers:
        training.train_buffer(buffer)
    return training.finish()


def _summarise(window: list[dict[str, float]], step: int) -> dict[str, float]:
    mean = {key: float(np.mean([w[key] for w in window])) for key in window[0]}
    out = {"step": step, "fve": 1.0 - mean["mse"] / max(mean["var"], 1e-12), "l0": mean["l0"], "mse": mean["mse"]}
    for key in ("l1", "aux"):
        if key in mean:
            out[key] = mean[key]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Streaming a layer's MLP activations from the model over the corpus.


def held_out_windows(shard_paths: list[str | os.PathLike], eval_tokens: int, seed: int) -> np.ndarray:
    """The corpus windows held out from SAE training, on which its quality is measured: a seeded random sample of
    whole windows, drawn until they hold `eval_tokens` tokens (BOS not counted). Sorted window ids."""
    from . import schemas
    from .storage import read_parquet

    ids, sizes = [], []
    for path in shard_paths:
        table = read_parquet(path, schemas.WINDOWS)
        ids.append(table.column("window").to_numpy())
        lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()], dtype=np.int64)
        sizes.append(lengths - table.column("n_prefix").to_numpy().astype(np.int64))
    ids_all, sizes_all = np.concatenate(ids), np.concatenate(sizes)
    order = np.argsort(ids_all, kind="stable")
    ids_all, sizes_all = ids_all[order], sizes_all[order]
    picked = np.random.default_rng(seed).permutation(len(ids_all))
    count = int(np.searchsorted(np.cumsum(sizes_all[picked]), eval_tokens) + 1) if eval_tokens > 0 else 0
    if count >= len(ids_all) and eval_tokens > 0:
        raise PipelineError(f"sae.eval_tokens: {eval_tokens} held-out tokens would leave nothing to train on "
                            f"(the corpus has {int(sizes_all.sum())} tokens)")
    return np.sort(ids_all[picked[:count]])


class _Collector:
    """Stands in for an accumulator in activations.stream_shard: gathers h at the valid tokens of the windows not
    held out, and trains on them a buffer at a time (outside the stream's inference mode)."""

    def __init__(self, training: SAETraining, held_out: np.ndarray, window_tokens: int, buffer_tokens: int,
                 limit: int | None):
        self.training, self.T, self.buffer_tokens, self.limit = training, window_tokens, buffer_tokens, limit
        self.held_out = torch.from_numpy(held_out.astype(np.int64))
        self.chunks: list[torch.Tensor] = []
        self.pending = 0
        self.taken = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.taken >= self.limit

    def update(self, act, pre, x, valid, token_index, where: str = "") -> None:
        keep = valid & ~torch.isin(token_index // self.T, self.held_out)
        h = act[keep.to(act.device)]
        if self.limit is not None:
            h = h[: max(0, self.limit - self.taken)]
        if h.shape[0] == 0:
            return
        with torch.inference_mode(False):
            self.chunks.append(h.float().clone())
        self.pending += h.shape[0]
        self.taken += h.shape[0]
        if self.pending >= self.buffer_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.chunks:
            return
        with torch.inference_mode(False), torch.enable_grad():
            buffer = torch.cat(self.chunks)
            self.chunks, self.pending = [], 0
            self.training.train_buffer(buffer)


def _stream_settings(window_tokens: int, compute: dict[str, Any]):
    from .activations import CacheSettings

    return CacheSettings(top_k=1, context_before=0, context_after=0, window_tokens=window_tokens,
                         batch_size=compute.get("batch_size", 16), device=compute.get("device", "auto"),
                         dtype=compute.get("dtype", "float32"))


def _load_model(model_dir, layers: list[int], device_name: str, dtype: str, trust_remote_code: bool,
                whole: bool = False):
    """The model on its device; only its blocks up to the deepest of `layers` unless the whole model is needed
    (the LM loss of the evaluation)."""
    from .activations import check_layers
    from .models import DTYPES, load_prepared, pick_device, read_manifest

    info = read_manifest(model_dir)
    check_layers(layers, info.n_layers, info.architecture)
    model, tokenizer, info = load_prepared(model_dir, trust_remote_code, up_to_layer=None if whole else max(layers))
    device = pick_device(device_name)
    model.to(device=device, dtype=DTYPES[dtype])
    return model, tokenizer, info, device


def _shard_name(path: str | os.PathLike) -> str:
    return Path(path).stem.replace("shard-", "")


def train_sae(
    model_dir: str | os.PathLike,
    shard_paths: list[str | os.PathLike],
    layer: int,
    out_dir: str | os.PathLike,
    training_path: str | os.PathLike,
    settings: TrainSettings,
    window_tokens: int,
    compute: dict[str, Any],
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Train an SAE on layer `layer`'s MLP activations, streamed from the model over the corpus shards (the held-out
    windows excepted), and save it in the SAELens layout plus a training record (loss curve) as JSON."""
    from .activations import stream_shard
    from .storage import provenance, write_json

    settings.check()
    stream = _stream_settings(window_tokens, compute)
    model, tokenizer, info, device = _load_model(model_dir, [layer], stream.device, stream.dtype, trust_remote_code)
    held_out = held_out_windows(shard_paths, settings.eval_tokens, settings.seed)
    total = _corpus_tokens(shard_paths) - _window_tokens_of(shard_paths, held_out)
    expected = min(total, settings.train_tokens) if settings.train_tokens else total
    training = SAETraining(info.n_neurons, settings, device, expected, layer)
    collector = _Collector(training, held_out, window_tokens, settings.buffer_tokens, settings.train_tokens)
    for path in shard_paths:
        if collector.full:
            break
        stream_shard(model, tokenizer, info, path, [layer], {layer: collector}, stream, device, _shard_name(path),
                     f"sae layer {layer} shard {_shard_name(path)}")
    collector.flush()
    sae, record = training.finish()
    meta = provenance("sae_training", asdict(settings), layer=layer, model=asdict(info), compute=compute,
                      held_out_windows=int(len(held_out)))
    save_sae(sae, out_dir, meta, model_name=info.source, context_size=window_tokens)
    write_json({**meta, **record}, training_path)
    last = record["curve"][-1]
    return {"tokens": record["tokens"], "steps": record["steps"], "train_fve": last["fve"], "train_l0": last["l0"]}


def _corpus_tokens(shard_paths) -> int:
    return _window_tokens_of(shard_paths, None)


def _window_tokens_of(shard_paths, windows: np.ndarray | None) -> int:
    from . import schemas
    from .storage import read_parquet

    total = 0
    for path in shard_paths:
        table = read_parquet(path, schemas.WINDOWS)
        ids = table.column("window").to_numpy()
        lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()], dtype=np.int64)
        sizes = lengths - table.column("n_prefix").to_numpy().astype(np.int64)
        total += int(sizes.sum() if windows is None else sizes[np.isin(ids, windows)].sum())
    return total


def import_sae(folder: str | os.PathLike, out_dir: str | os.PathLike, layer: int, model_dir: str | os.PathLike) -> dict[str, Any]:
    """An external SAE (SAELens layout), checked against the layer it is configured for and saved in ours."""
    from .models import MANIFEST
    from .storage import provenance

    sae = load_sae(folder)
    n_neurons = int(json.loads((Path(model_dir) / MANIFEST).read_text())["n_neurons"])
    check_fits(sae, layer, n_neurons, f"sae.external '{folder}'")
    sae.layer = layer
    meta = provenance("sae_import", {"path": str(folder)}, layer=layer, source_meta=sae.meta)
    save_sae(sae, out_dir, meta, model_name=sae.meta.get("model_name"))
    return {"d_in": sae.d_in, "d_sae": sae.d_sae, "architecture": sae.architecture}


# ---------------------------------------------------------------------------------------------------------------
# Latents as units: the neurons' selection machinery (topk.py) on the SAE's latents.


class _LatentFeed:
    """Stands in for an accumulator in activations.stream_shard: turns the layer's MLP activations h into the SAE's
    input x = h - b_dec, pre-activations and latent activations, and feeds them to the neurons' accumulator."""

    def __init__(self, sae: SparseAutoencoder, accumulator: Any):
        self.sae, self.acc = sae, accumulator

    def update(self, act, pre, x, valid, token_index, where: str = "") -> None:
        x_sae = self.sae.sae_input(act.float())
        pre_sae = self.sae.pre_activation(x_sae)
        self.acc.update(self.sae.activation(pre_sae), [pre_sae], x_sae, valid, token_index, where)


class _Fanout:
    def __init__(self, feeds: list[Any]):
        self.feeds = feeds

    def update(self, *args, **kwargs) -> None:
        for feed in self.feeds:
            feed.update(*args, **kwargs)


def drop_inactive(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Empty every kept entry where the latent was not active (activation <= 0): a latent's examples are tokens
    where it fires. Emptied entries rank last in the merge (key -inf) and are skipped by the embedding stage, so a
    latent that fires on fewer tokens than the selection asks for has fewer examples, and one that never fires
    has none (selection.finalize applies the same rule to the merged selection of neurons)."""
    from .selection import PREFIXES, empty_entries

    for prefix in PREFIXES:
        if f"{prefix}values" in state:
            state = empty_entries(state, prefix, ~(state[f"{prefix}values"] > 0))
    return state


def cache_sae_shard(
    model_dir: str | os.PathLike,
    shard_path: str | os.PathLike,
    saes: dict[str, tuple[int, str | os.PathLike]],
    out_paths: dict[str, str | os.PathLike],
    settings: Any,
    shard: str = "",
    trust_remote_code: bool = False,
    stats_paths: dict[str, str | os.PathLike] | None = None,
    stats_only: bool = False,
) -> dict[str, Any]:
    """One corpus shard through the model (once, up to the deepest SAE's layer) for every SAE: per SAE, either
    pass-1 statistics of its latents (stats_only) or its latents' selected examples, in the files and layout the
    neurons' caching writes (activations.stats_shard / cache_shard), so selection.merge_layer merges them."""
    from .activations import StatsOnly, stream_shard
    from .models import DTYPES
    from .storage import load_tensors, provenance, save_tensors
    from .topk import ThresholdAccumulator, TopKAccumulator

    layers = sorted({layer for layer, _ in saes.values()})
    model, tokenizer, info, device = _load_model(model_dir, layers, settings.device, settings.dtype, trust_remote_code)
    # ReLU and TopK latents are never negative: selection.sign applies to the neurons, the latents' is positive
    settings = replace(settings, sign="positive")
    before, after = settings.context_before, settings.context_after
    accumulators: dict[str, Any] = {}
    feeds: dict[int, list[_LatentFeed]] = {layer: [] for layer in layers}
    for name, (layer, folder) in saes.items():
        sae = load_sae(folder, device)
        check_fits(sae, layer, info.n_neurons, f"SAE '{name}'")
        if stats_only:
            acc = StatsOnly(sae.d_sae, settings.histogram_stride)
        elif settings.mode == "top_k":
            acc = TopKAccumulator(sae.d_sae, sae.d_in, 1, settings.top_k, before, after, settings.histogram_stride,
                                  DTYPES[settings.store_dtype])
        elif settings.mode == "threshold":
            if not stats_paths or name not in stats_paths:
                raise PipelineError(f"selection.mode: threshold needs the merged statistics of SAE '{name}'")
            stats, _ = load_tensors(stats_paths[name])
            top = torch.from_numpy(stats["stat_max"]).float()
            # A latent that never fired has max 0: a floor above every activation leaves it without examples.
            top = torch.where(top > 0, top, torch.finfo(torch.float32).max / 2)
            acc = ThresholdAccumulator(top, sae.d_in, 1, settings.alpha, settings.cap, before, after, settings.seed,
                                       settings.quantile_bins, settings.quantile_per_bin, settings.histogram_stride,
                                       DTYPES[settings.store_dtype])
        else:
            raise PipelineError(f"selection.mode: unknown mode '{settings.mode}' (top_k, threshold)")
        accumulators[name] = acc
        feeds[layer].append(_LatentFeed(sae, acc))
    desc = f"sae {'stats' if stats_only else 'cache'} shard {shard}"
    result = stream_shard(model, tokenizer, info, shard_path, layers, {layer: _Fanout(f) for layer, f in feeds.items()},
                          settings, device, shard, desc)
    stage = "sae_activation_stats" if stats_only else "sae_activations"
    for name, acc in accumulators.items():
        state = acc.state() if stats_only else drop_inactive(acc.state())
        arrays = {key: t.numpy() for key, t in state.items()}
        for key in [k for k in arrays if k == "x" or k.endswith(".x")]:
            arrays[key] = arrays[key].astype(np.dtype(settings.store_dtype))
        meta = provenance(stage, asdict(settings), model=asdict(info), shard=shard, device=str(device),
                          layer=saes[name][0], units={"kind": "sae_latents", "sae": name}, **result)
        save_tensors(arrays, out_paths[name], meta)
    return result


def embed_latents(selection_path, sae_dir, model_dir, corpus_shards, out_path, layer: int, name: str,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """The neurons' embedding stage on the latents: embedding = x * W_enc[:, f], bias b_enc[f]; the same invariant
    (sum + bias = the latent's pre-activation) is checked before the file is written."""
    from .embeddings import build_embeddings

    sae = load_sae(sae_dir)
    units = {"kind": "sae_latents", "sae": name, "architecture": sae.architecture, "d_sae": sae.d_sae,
             "projections": ["W_enc"]}
    return build_embeddings(selection_path, model_dir, corpus_shards, out_path, layer, trust_remote_code,
                            weights=sae.unit_weights(), units=units)


# ---------------------------------------------------------------------------------------------------------------
# Quality: fraction of variance explained, L0, dead latents, and the LM loss with the reconstruction spliced in.


def _eval_batches(shard_paths, windows: np.ndarray, batch_size: int, pad_id: int):
    """(input_ids [B, T], valid [B, T]) over the given windows, in window order; valid = real tokens, BOS excluded."""
    from .activations import load_windows

    rows = []
    for path in shard_paths:
        ids, n_prefix, input_ids = load_windows(path)
        for w, p, seq in zip(ids.tolist(), n_prefix.tolist(), input_ids):
            if w in windows:
                rows.append((w, int(p), seq))
    rows.sort()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(seq) for _, _, seq in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (_, p, seq) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            valid[r, p : len(seq)] = True
        yield ids, valid


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting token t+1 at every position t where t and t+1 are real tokens."""
    target_ok = valid[:, :-1] & valid[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
    return float(nll[target_ok.to(logits.device)].double().sum()), int(target_ok.sum())


def evaluate_sae(
    model_dir: str | os.PathLike,
    sae_dir: str | os.PathLike,
    shard_paths: list[str | os.PathLike],
    selection_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
    name: str,
    eval_tokens: int,
    seed: int,
    compute: dict[str, Any],
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The standard SAE quality figures, on the held-out windows (never trained on):

    - fve: fraction of variance explained, 1 - sum |h - h^|^2 / sum |h - mean h|^2 over the held-out tokens;
    - l0: latents active per token (held-out tokens); l0_corpus and dead_fraction (latents never active) over the
      whole corpus, from the latents' selection statistics;
    - ce_clean, ce_spliced, ce_zero_ablation: the LM's next-token loss (nats per token) as is, with the layer's MLP
      activations replaced by the SAE's reconstruction, and by zeros (at every real token; BOS left alone);
      loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 is a perfect SAE, 0 no better than zeros.
    """
    from .adapters import adapter_for
    from .storage import load_tensors, provenance, write_json

    stream = _stream_settings(0, compute)
    model, tokenizer, info, device = _load_model(model_dir, [layer], stream.device, stream.dtype, trust_remote_code, whole=True)
    sae = load_sae(sae_dir, device)
    check_fits(sae, layer, info.n_neurons, f"SAE '{name}'")
    adapter = adapter_for(model)
    out_proj = adapter.out_projection(model, layer)
    windows = set(held_out_windows(shard_paths, eval_tokens, seed).tolist())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch_size = 16 if stream.batch_size == "auto" else int(stream.batch_size)

    state: dict[str, Any] = {"mode": "clean", "valid": None}
    sums = {"sq_err": 0.0, "sq": 0.0, "n": 0, "active": 0}
    h_sum = torch.zeros(info.n_neurons, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero": [0.0, 0]}

    def hook(_module, args):
        h, valid = args[0], state["valid"].to(args[0].device)
        if state["mode"] == "clean":
            rows = h[valid].float()
            f = sae.encode(rows)
            recon = sae.decode(f)
            sums["sq_err"] += float((rows - recon).double().pow(2).sum())
            sums["sq"] += float(rows.double().pow(2).sum())
            sums["n"] += rows.shape[0]
            sums["active"] += int((f > 0).sum())
            h_sum.add_(rows.double().sum(0).cpu())
            fired.logical_or_((f > 0).any(0).cpu())
            return None
        replaced = h.clone()
        replaced[valid] = sae.reconstruct(h[valid]) if state["mode"] == "spliced" else 0.0
        return (replaced, *args[1:])

    handle = out_proj.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for ids, valid in _eval_batches(shard_paths, windows, batch_size, pad_id):
                state["valid"] = valid
                for mode in ("clean", "spliced", "zero"):
                    state["mode"] = mode
                    logits = model(input_ids=ids.to(device), use_cache=False).logits
                    total, count = _next_token_loss(logits, ids, valid)
                    ce[mode][0] += total
                    ce[mode][1] += count
    finally:
        handle.remove()
    n = max(sums["n"], 1)
    variance = sums["sq"] - float(h_sum.pow(2).sum()) / n
    stats, _ = load_tensors(selection_path)
    n_tokens = max(int(stats["n_tokens"][0]), 1)
    clean, spliced, zero = (ce[m][0] / max(ce[m][1], 1) for m in ("clean", "spliced", "zero"))
    result = {
        "sae": name,
        "layer": layer,
        "architecture": sae.architecture,
        "k": sae.k,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "expansion": sae.d_sae / sae.d_in,
        "eval_tokens": sums["n"],
        "eval_windows": len(windows),
        "fve": 1.0 - sums["sq_err"] / max(variance, 1e-12),
        "l0": sums["active"] / n,
        "dead_fraction_eval": float(1.0 - fired.float().mean()),
        "corpus_tokens": n_tokens,
        "l0_corpus": float(stats["stat_positive"].sum() / n_tokens),
        "dead_fraction": float((stats["stat_positive"] == 0).mean()),
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablation": zero,
        "ce_increase": spliced - clean,
        "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else None,
        "ce_tokens": ce["clean"][1],
    }
    meta = provenance("sae_quality", {"eval_tokens": eval_tokens, "seed": seed}, model=asdict(info), compute=compute)
    write_json({**result, "provenance": meta}, out_path)
    return {k: result[k] for k in ("fve", "l0", "dead_fraction", "loss_recovered")}


# ---------------------------------------------------------------------------------------------------------------
# Neurons against SAE latents: the polysemanticity measures side by side.


def bootstrap_ci(values: np.ndarray, stat: str = "median", n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(statistic, low, high): the statistic of `values` and its percentile bootstrap interval (units resampled
    with replacement, seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None, None, None
    fn = {"median": np.median, "mean": np.mean}[stat]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for start in range(0, n_boot, 100):  # in blocks, so memory stays small for large layers
        idx = rng.integers(0, values.size, size=(min(100, n_boot - start), values.size))
        draws[start : start + idx.shape[0]] = fn(values[idx], axis=1)
    tail = (1.0 - level) / 2
    return float(fn(values)), float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def unit_summary(metrics_path: str | os.PathLike, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Clusters per unit and mean pairwise distance of one set of units (a metrics/*.parquet), as medians and
    means with bootstrap 95% intervals, over the live units (metrics.py: not dead, at least min_examples)."""
    from . import schemas
    from .storage import read_parquet

    table = read_parquet(metrics_path, schemas.METRICS)
    size = table.column("size").to_numpy()
    clusters = table.column("n_clusters").to_numpy()
    distance = np.array([np.nan if v is None else v for v in table.column("mean_distance").to_pylist()], dtype=np.float64)
    keep = np.array([status == "live" for status in table.column("status").to_pylist()], dtype=bool)
    out: dict[str, Any] = {"units": int(size.size), "units_with_examples": int((size > 0).sum()),
                           "units_compared": int(keep.sum()),
                           "median_examples": float(np.median(size[keep])) if keep.any() else None}
    for key, values in (("clusters_per_unit", clusters[keep]), ("mean_distance", distance[keep]),
                        ("polysemantic", (clusters[keep] > 1).astype(np.float64))):
        for stat in ("median", "mean"):
            if key == "polysemantic" and stat == "median":
                continue
            value, low, high = bootstrap_ci(values, stat, n_boot, seed)
            out[f"{key}_{stat}"] = {"value": value, "ci95": [low, high]}
    return out


def compare_units(neuron_metrics: str | os.PathLike, latent_metrics: str | os.PathLike, quality_path: str | os.PathLike,
                  out_json: str | os.PathLike, out_png: str | os.PathLike, name: str, layer: int,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The layer's neurons against the SAE's latents: summary JSON (with the SAE's quality figures) and a plot of
    the two distributions (clusters per unit, mean pairwise cosine distance)."""
    from . import schemas
    from .figures import finite, hist
    from .metrics import live
    from .storage import atomic_path, parquet_provenance, read_parquet, write_json

    quality = json.loads(Path(quality_path).read_text())
    quality.pop("provenance", None)
    result = {
        "sae": name,
        "layer": layer,
        "quality": quality,
        "clustering": parquet_provenance(latent_metrics).get("clustering"),
        "neurons": unit_summary(neuron_metrics, n_boot, seed),
        "latents": unit_summary(latent_metrics, n_boot, seed),
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95, "over": "live units"},
    }
    write_json(result, out_json)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), dpi=100)
    colours = {"neurons": "#4c72b0", "latents": "#dd8452"}
    for label, path in (("neurons", neuron_metrics), ("latents", latent_metrics)):
        table = live(read_parquet(path, schemas.METRICS))
        clusters = table.column("n_clusters").to_numpy()
        distance = finite(table.column("mean_distance").to_pylist())
        text = f"{label} (n={table.num_rows})" if label == "neurons" else f"SAE latents (n={table.num_rows})"
        hist(axes[0], clusters, integer=True, density=True, histtype="step", linewidth=1.5, color=colours[label],
             label=text)
        hist(axes[1], distance, np.linspace(0, max(1.0, float(distance.max(initial=0.0))), 41), density=True,
             histtype="step", linewidth=1.5, color=colours[label], label=text)
    axes[0].set(title=f"layer {layer}: feature clusters per unit", xlabel="clusters", ylabel="share of units")
    axes[1].set(title=f"layer {layer}: mean pairwise cosine distance", xlabel="distance", ylabel="density")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"MLP neurons vs SAE '{name}' latents", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {"neurons_clusters_median": result["neurons"]["clusters_per_unit_median"]["value"],
            "latents_clusters_median": result["latents"]["clusters_per_unit_median"]["value"]}
