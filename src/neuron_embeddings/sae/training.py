"""Training an SAE on a layer's MLP activations: a ReLU SAE with an L1 penalty and unit-norm decoder rows (Bricken et
al. 2023, "Towards Monosemanticity") or a TopK SAE with the AuxK loss (Gao et al. 2024), fed buffer by buffer with
activations streamed from the model over the corpus (the held-out windows excepted), saved in the SAELens layout."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..activations import stream_shard
from ..errors import PipelineError
from ..storage import provenance, write_json
from .model import SparseAutoencoder
from .saelens_io import check_dense_model, save_sae
from .streaming import held_out_windows, load_model, real_tokens, shard_name, stream_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Every field is required: the workflow passes a validated config's settings (config.sae_specs), whose defaults
    live in the config schema only; outside the workflow `TrainSettings(**config.train_settings(lr=...))` takes
    the schema's defaults for the settings not given."""

    architecture: str  # relu (L1 penalty, Bricken et al.) or topk (Gao et al.)
    expansion: int  # d_sae = expansion x d_in (the MLP's neurons)
    k: int | None  # topk: latents active per token (None for relu)
    l1_coefficient: float | None  # relu: weight of sum_f f (decoder rows have unit norm), on normalised inputs (None for topk)
    lr: float  # Adam
    batch_size: int  # tokens per optimiser step
    epochs: int  # passes over each buffer of streamed activations
    buffer_tokens: int  # activations held and shuffled at once
    train_tokens: int | None  # stop after this many streamed tokens (None: the whole corpus but eval)
    eval_tokens: int  # held out from training: quality figures are measured on these
    warmup_fraction: float  # of the steps: lr (and the L1 coefficient) ramp up linearly
    aux_k_coefficient: float  # topk: weight of the AuxK loss that revives dead latents (Gao et al.)
    dead_after_tokens: int  # topk AuxK: a latent silent for this many training tokens counts as dead
    seed: int

    def check(self) -> None:
        if self.architecture not in ("relu", "topk"):
            raise PipelineError(f"sae.architecture: can train relu or topk, not '{self.architecture}'")
        if self.architecture == "topk" and self.k is None:
            raise PipelineError("sae.train: a topk SAE needs k")
        if self.architecture == "relu" and self.l1_coefficient is None:
            raise PipelineError("sae.train: a relu SAE needs l1_coefficient")


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
                    self.curve.append(_summarize(self._window, self.trainer.step_count))
                    self._window = []

    def finish(self) -> tuple[SparseAutoencoder, dict[str, Any]]:
        if self.trainer is None:
            raise PipelineError("sae: no activations to train on (is the corpus empty, or all held out?)")
        if self._window:
            self.curve.append(_summarize(self._window, self.trainer.step_count))
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


def _summarize(window: list[dict[str, float]], step: int) -> dict[str, float]:
    mean = {key: float(np.mean([w[key] for w in window])) for key in window[0]}
    out = {"step": step, "fve": 1.0 - mean["mse"] / max(mean["var"], 1e-12), "l0": mean["l0"], "mse": mean["mse"]}
    for key in ("l1", "aux"):
        if key in mean:
            out[key] = mean[key]
    return out


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


def train_sae(
    model_dir: str | os.PathLike,
    shard_paths: list[str | os.PathLike],
    layer: int,
    out_dir: str | os.PathLike,
    training_path: str | os.PathLike,
    settings: TrainSettings,
    window_tokens: int,
    compute: dict[str, Any],
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Train an SAE on layer `layer`'s MLP activations, streamed from the model over the corpus shards (the held-out
    windows excepted), and save it in the SAELens layout plus a training record (loss curve) as JSON."""
    settings.check()
    check_dense_model(model_dir, layer, "sae.train")
    stream = stream_settings(window_tokens, compute)
    model, tokenizer, info, device = load_model(model_dir, [layer], stream.device, stream.dtype, trust_remote_code)
    held_out = held_out_windows(shard_paths, settings.eval_tokens, settings.seed)
    total = real_tokens(shard_paths) - real_tokens(shard_paths, held_out)
    expected = min(total, settings.train_tokens) if settings.train_tokens else total
    training = SAETraining(info.n_neurons, settings, device, expected, layer)
    collector = _Collector(training, held_out, window_tokens, settings.buffer_tokens, settings.train_tokens)
    for path in shard_paths:
        if collector.full:
            break
        stream_shard(model, tokenizer, info, path, [layer], {layer: collector}, stream, device, shard_name(path),
                     f"sae layer {layer} shard {shard_name(path)}")
    collector.flush()
    sae, record = training.finish()
    meta = provenance("sae_training", asdict(settings), layer=layer, model=asdict(info), compute=compute,
                      held_out_windows=int(len(held_out)))
    save_sae(sae, out_dir, meta, model_name=info.source, context_size=window_tokens)
    write_json({**meta, **record}, training_path)
    last = record["curve"][-1]
    return {"tokens": record["tokens"], "steps": record["steps"], "train_fve": last["fve"], "train_l0": last["l0"]}
