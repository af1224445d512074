"""Activation caching: run the model over one corpus shard and keep, per layer, each neuron's strongest examples.

Only the transformer body runs (never the LM head), and it stops right after the deepest requested layer.
Forward hooks capture, per requested layer, the MLP input x, the pre-activations and the activations
(see adapters.py for the named hook points); a TopKAccumulator per layer keeps the top-k per neuron with x
at those tokens, so memory does not grow with the shard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import schemas
from .adapters import MLPCapture, adapter_for, run_capture
from .errors import PipelineError
from .models import DTYPES, load_prepared, pick_device
from .storage import provenance, read_parquet, save_tensors
from .topk import TopKAccumulator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    top_k: int
    context_before: int
    context_after: int
    window_tokens: int
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"


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


def cache_shard(
    model_dir: str | os.PathLike,
    shard_path: str | os.PathLike,
    layers: list[int],
    out_paths: dict[int, str | os.PathLike],
    settings: CacheSettings,
    shard: str = "",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    model, tokenizer, info = load_prepared(model_dir, trust_remote_code)
    check_layers(layers, info.n_layers, info.architecture)
    adapter = adapter_for(model)
    device = pick_device(settings.device)
    dtype = DTYPES[settings.dtype]
    model.to(device=device, dtype=dtype)
    body = adapter.body(model)
    windows, n_prefix, input_ids = load_windows(shard_path)
    T = settings.window_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    accumulators = {
        layer: TopKAccumulator(
            info.n_neurons, info.d_model, info.n_projections, settings.top_k,
            settings.context_before, settings.context_after,
        )
        for layer in layers
    }
    # Batches of windows of similar length, padded only to their longest: the canonical top-k makes the
    # result independent of batch composition and order, so this changes speed, never the output.
    lengths_all = np.array([len(ids) for ids in input_ids])
    order = np.argsort(-lengths_all, kind="stable")
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    with MLPCapture(model, adapter, layers, stop_after_last=True) as capture, torch.inference_mode():
        for members in tqdm(batches, desc=f"cache shard {shard}", unit="batch", mininterval=2.0):
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
                acc.update(slot["act"], slot["pre"], slot["x"], valid, token_index, where=f"layer {layer} shard {shard}")
    meta = provenance(
        "activations", asdict(settings), model=asdict(info), shard=shard, device=str(device), n_windows=len(windows)
    )
    for layer, acc in accumulators.items():
        state = {name: t.numpy() for name, t in acc.state().items()}
        save_tensors(state, out_paths[layer], {**meta, "layer": layer})
    tokens = int(sum(len(i) for i in input_ids))
    return {"windows": len(windows), "tokens": tokens}
