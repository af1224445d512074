"""Merge the per-shard caches of one layer into each neuron's final selection of examples.

top_k: the k strongest examples per neuron. threshold (the paper's): a uniform sample of at most `cap` of the
examples with activation >= alpha x the neuron's max, the max measured in pass 1 over the whole corpus; plus,
optionally, `per_bin` examples from each of `bins` activation bins below that. Both are exact merges: the result
does not depend on how the corpus was sharded or in which order shards are merged.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import PipelineError
from .storage import load_tensors, provenance, save_tensors
from .topk import merge_states, merge_stats

SELECTION_MODES = ("top_k", "threshold")


def _load_layer_states(paths: list[str | os.PathLike], layer: int) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    states, metas = [], []
    for path in paths:
        tensors, meta = load_tensors(path)
        if meta.get("layer") != layer:
            raise PipelineError(f"{path}: holds layer {meta.get('layer')}, expected layer {layer}")
        states.append({name: torch.from_numpy(t) for name, t in tensors.items()})
        metas.append(meta)
    return states, metas


def merge_layer_stats(shard_paths: list[str | os.PathLike], out_path: str | os.PathLike, layer: int) -> dict[str, Any]:
    """Pass 1 merged: per-neuron statistics over the whole corpus (the max sets the threshold of pass 2)."""
    states, metas = _load_layer_states(shard_paths, layer)
    merged = merge_stats(states)
    meta = provenance("activation_stats_merged", {}, layer=layer, model=metas[0]["model"], shards=[m.get("shard") for m in metas])
    save_tensors({name: t.numpy() for name, t in merged.items()}, out_path, meta)
    return {"tokens": int(merged["n_tokens"][0])}


def merge_layer(
    shard_paths: list[str | os.PathLike],
    out_path: str | os.PathLike,
    top_k: int,
    layer: int,
    mode: str = "top_k",
    quantile_per_bin: int = 0,
) -> dict[str, Any]:
    """`top_k` is the number kept per neuron: top_k in top_k mode, cap in threshold mode."""
    if mode not in SELECTION_MODES:
        raise PipelineError(f"selection.mode: unknown mode '{mode}' ({', '.join(SELECTION_MODES)})")
    states, metas = _load_layer_states(shard_paths, layer)
    for path, meta in zip(shard_paths, metas):
        if meta["settings"].get("mode", "top_k") != mode:
            raise PipelineError(f"{path}: cached in mode {meta['settings'].get('mode')}, selection asks {mode}")
    merged = merge_states(states, top_k, quantile_per_bin or None)
    first = metas[0]
    kept = torch.isfinite(merged["values"]).sum().item()
    meta = provenance(
        "selection",
        {"mode": mode, "k": top_k, "quantile_per_bin": quantile_per_bin},
        layer=layer,
        model=first["model"],
        cache_settings=first["settings"],
        shards=[m.get("shard") for m in metas],
        examples=int(kept),
    )
    save_tensors({name: t.numpy() for name, t in merged.items()}, out_path, meta)
    return {"tokens": int(merged["n_tokens"][0]), "examples": int(kept)}
