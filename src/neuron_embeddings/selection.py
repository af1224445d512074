"""Merge the per-shard caches of one layer into each neuron's final selection of examples (top-k)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import PipelineError
from .storage import load_tensors, provenance, save_tensors
from .topk import merge_states

SELECTION_MODES = ("top_k",)


def merge_layer(shard_paths: list[str | os.PathLike], out_path: str | os.PathLike, top_k: int, layer: int) -> dict[str, Any]:
    states, metas = [], []
    for path in shard_paths:
        tensors, meta = load_tensors(path)
        if meta.get("layer") != layer:
            raise PipelineError(f"{path}: holds layer {meta.get('layer')}, expected layer {layer}")
        if meta["settings"]["top_k"] < top_k:
            raise PipelineError(f"{path}: cached with top_k={meta['settings']['top_k']}, selection asks {top_k}")
        states.append({name: torch.from_numpy(t) for name, t in tensors.items()})
        metas.append(meta)
    merged = merge_states(states, top_k)
    first = metas[0]
    meta = provenance(
        "selection",
        {"mode": "top_k", "top_k": top_k},
        layer=layer,
        model=first["model"],
        cache_settings=first["settings"],
        shards=[m.get("shard") for m in metas],
    )
    save_tensors({name: t.numpy() for name, t in merged.items()}, out_path, meta)
    return {"tokens": int(merged["n_tokens"][0])}
