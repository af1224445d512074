"""Activation caching: run the model over one corpus shard and keep, per layer, each neuron's strongest examples.

Only the transformer body runs (never the LM head), and it stops right after the deepest requested layer.
Forward hooks capture, per requested layer, the MLP input x, the pre-activations and the activations
(see adapters.py for the named hook points); a TopKAccumulator per layer keeps the top-k per neuron with x
at those tokens, so memory does not grow with the shard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import schemas
from .adapters import MLPCapture, adapter_for, run_capture
from .errors import PipelineError
from .models import DTYPES, load_prepared, pick_device, read_manifest
from .storage import load_tensors, provenance, read_parquet, save_tensors
from .topk import OnePassAccumulator, Stats, ThresholdAccumulator, TopKAccumulator, make_batch, score_max

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    top_k: int
    context_before: int
    context_after: int
    window_tokens: int
    batch_size: int | str = 16  # or "auto": from free GPU memory (CUDA), 16 on the CPU
    device: str = "auto"
    dtype: str = "float32"  # compute precision of the forward pass
    store_dtype: str = "float32"  # precision of the stored MLP inputs x (float16 halves the cache)
    mode: str = "top_k"  # or "threshold"
    passes: int = 1  # threshold mode: 1 (max and sample in one exact pass) or 2 (needs the merged pass-1 statistics)
    alpha: float = 0.75
    cap: int = 200
    quantile_bins: int = 0
    quantile_per_bin: int = 0
    seed: int = 0
    histogram_stride: int = 8  # histograms count 1 token in this many (by token index); 1 = every token
    sign: str = "auto"  # which activations are examples: positive, negative, both (|a|); auto: see resolve_sign


def resolve_sign(sign: str, info: Any) -> str:
    """auto: both signs for a gated MLP, whose act(gate) * up is as strong below zero as above (the output
    projection reads either sign), and the positive side for GELU/ReLU neurons, whose negative side is bounded
    (GELU's minimum is -0.17) and carries next to nothing."""
    if sign != "auto":
        return sign
    return "both" if int(info.n_projections) == 2 else "positive"


def check_layers(layers: list[int], n_layers: int, model_name: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise PipelineError(f"layers: {bad} out of range for {model_name}, which has layers 0..{n_layers - 1}")


def load_windows(shard_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    table = read_parquet(shard_path, schemas.WINDOWS).sort_by("window")
    return (
        table.column("window").to_numpy(),
        table.column("n_prefix").to_numpy(),
        table.column("input_ids").to_pylist(),
    )


def auto_batch_size(info: Any, window_tokens: int, n_layers_cached: int, device: torch.device, dtype: torch.dtype) -> int:
    """Windows per batch that fit in half the free GPU memory; 16 on the CPU (larger batches gain nothing there)."""
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    item = torch.finfo(dtype).bits // 8
    # Per token: activations kept alive by hooks for each cached layer (act + pre per projection + x, fp32 copies
    # for selection), plus the model's own working set (~16 d_model-wide and 4 MLP-wide tensors per layer).
    per_token = (n_layers_cached * (info.n_neurons * (2 + info.n_projections) + info.d_model) * 4
                 + (16 * info.d_model + 4 * info.n_neurons) * item)
    return int(max(1, min(1024, (free // 2) // (per_token * window_tokens))))


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    # Windows of similar length together, padded only to their longest: the canonical ranking makes every
    # selection independent of batch composition and order, so this changes speed, never the output.
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def stream_shard(
    model: torch.nn.Module,
    tokenizer: Any,
    info: Any,
    shard_path: str | os.PathLike,
    layers: list[int],
    accumulators: dict[int, Any],
    settings: CacheSettings,
    device: torch.device,
    shard: str,
    desc: str,
) -> dict[str, int]:
    """Run the body over every window of a shard, feeding each layer's accumulator."""
    adapter = adapter_for(model)
    body = adapter.body(model)
    windows, n_prefix, input_ids = load_windows(shard_path)
    T = settings.window_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths_all = np.array([len(ids) for ids in input_ids], dtype=np.int64)
    if settings.batch_size == "auto":
        batch_size = auto_batch_size(info, T, len(layers), device, next(model.parameters()).dtype)
    else:
        batch_size = int(settings.batch_size)
    with MLPCapture(model, adapter, layers, stop_after_last=True) as capture, torch.inference_mode():
        for members in tqdm(_batches(lengths_all, batch_size), desc=desc, unit="batch", mininterval=2.0):
            width = int(lengths_all[members].max())
            # Right padding and no attention mask: attention is causal, so padding never reaches a real token.
            ids = torch.full((len(members), width), pad_id, dtype=torch.int64)
            for row, i in enumerate(members):
                ids[row, : lengths_all[i]] = torch.tensor(input_ids[i], dtype=torch.int64)
            positions = torch.arange(width)
            lengths = torch.from_numpy(lengths_all[members])
            prefix = torch.from_numpy(n_prefix[members].astype(np.int64))
            valid = (positions[None, :] < lengths[:, None]) & (positions[None, :] >= prefix[:, None])
            token_index = torch.from_numpy(windows[members].astype(np.int64))[:, None] * T + positions[None, :]
            run_capture(body, ids.to(device))
            for layer, acc in accumulators.items():
                slot = capture.captured[layer]
                routed = {"unit_valid": slot["unit_valid"]} if "unit_valid" in slot else {}
                acc.update(slot["act"], slot["pre"], slot["x"], valid, token_index, where=f"layer {layer} shard {shard}",
                           **routed)
    return {"windows": len(windows), "tokens": int(lengths_all.sum()), "batch_size": batch_size}


def _load_for_caching(model_dir, layers, settings, trust_remote_code):
    info = read_manifest(model_dir)
    check_layers(layers, info.n_layers, info.architecture)
    # Blocks past the deepest cached layer are never built: the forward stops there anyway.
    model, tokenizer, info = load_prepared(model_dir, trust_remote_code, up_to_layer=max(layers))
    device = pick_device(settings.device)
    model.to(device=device, dtype=DTYPES[settings.dtype])
    return model, tokenizer, info, device


def _save_states(accumulators, out_paths, meta, store_dtype: str) -> None:
    for layer, acc in accumulators.items():
        state = {name: t.numpy() for name, t in acc.state().items()}
        for name in [n for n in state if n == "x" or n.endswith(".x")]:
            state[name] = state[name].astype(np.dtype(store_dtype))
        save_tensors(state, out_paths[layer], {**meta, "layer": layer})


def stats_shard(
    model_dir: str | os.PathLike,
    shard_path: str | os.PathLike,
    layers: list[int],
    out_paths: dict[int, str | os.PathLike],
    settings: CacheSettings,
    shard: str = "",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Pass 1 of the threshold selection: per-neuron max, mean, positive count and histogram, nothing else."""
    model, tokenizer, info, device = _load_for_caching(model_dir, layers, settings, trust_remote_code)
    accumulators = {layer: StatsOnly(info.n_neurons, settings.histogram_stride) for layer in layers}
    settings = replace(settings, sign=resolve_sign(settings.sign, info))
    result = stream_shard(model, tokenizer, info, shard_path, layers, accumulators, settings, device, shard, f"stats shard {shard}")
    meta = provenance("activation_stats", asdict(settings), model=asdict(info), shard=shard, device=str(device), **result)
    _save_states(accumulators, out_paths, meta, settings.store_dtype)
    return result


class StatsOnly:
    def __init__(self, n_neurons: int, histogram_stride: int):
        self.stats = Stats(n_neurons, histogram_stride)

    def update(self, act, pre, x, valid, token_index, where: str = "", unit_valid=None) -> None:
        batch = make_batch(act, pre, x, valid, token_index, where)
        if batch is not None:
            self.stats.update(batch, where)

    def state(self) -> dict[str, torch.Tensor]:
        return self.stats.state()


def cache_shard(
    model_dir: str | os.PathLike,
    shard_path: str | os.PathLike,
    layers: list[int],
    out_paths: dict[int, str | os.PathLike],
    settings: CacheSettings,
    shard: str = "",
    trust_remote_code: bool = False,
    stats_paths: dict[int, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Cache one shard: per layer, each neuron's selected examples with x there, and statistics.

    top_k mode and the one-pass threshold mode need nothing else; the two-pass threshold mode needs the merged
    pass-1 statistics of each layer.
    """
    model, tokenizer, info, device = _load_for_caching(model_dir, layers, settings, trust_remote_code)
    settings = replace(settings, sign=resolve_sign(settings.sign, info))
    before, after = settings.context_before, settings.context_after
    x_dtype = DTYPES[settings.store_dtype]
    accumulators: dict[int, Any] = {}
    for layer in layers:
        if settings.mode == "top_k":
            accumulators[layer] = TopKAccumulator(
                info.n_neurons, info.d_model, info.n_projections, settings.top_k, before, after, settings.histogram_stride,
                x_dtype, sign=settings.sign,
            )
        elif settings.mode == "threshold" and settings.passes == 1:
            if settings.quantile_bins and settings.quantile_per_bin:
                raise PipelineError("selection.passes: 1 cannot sample selection.quantiles; use passes: 2")
            accumulators[layer] = OnePassAccumulator(
                info.n_neurons, info.d_model, info.n_projections, settings.alpha, settings.cap, before, after,
                settings.seed, settings.histogram_stride, x_dtype, sign=settings.sign,
            )
        elif settings.mode == "threshold":
            if not stats_paths or layer not in stats_paths:
                raise PipelineError(f"selection.mode: threshold needs the merged statistics of layer {layer}")
            stats, _ = load_tensors(stats_paths[layer])
            accumulators[layer] = ThresholdAccumulator(
                score_max(stats, settings.sign), info.d_model, info.n_projections, settings.alpha, settings.cap,
                before, after, settings.seed, settings.quantile_bins, settings.quantile_per_bin, settings.histogram_stride,
                x_dtype, sign=settings.sign,
            )
        else:
            raise PipelineError(f"selection.mode: unknown mode '{settings.mode}' (top_k, threshold)")
    result = stream_shard(model, tokenizer, info, shard_path, layers, accumulators, settings, device, shard, f"cache shard {shard}")
    meta = provenance("activations", asdict(settings), model=asdict(info), shard=shard, device=str(device), **result)
    _save_states(accumulators, out_paths, meta, settings.store_dtype)
    return result
