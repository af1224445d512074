"""Merge the per-shard caches of one layer into each neuron's final selection of examples.

top_k: the k strongest examples per neuron. threshold (the paper's): a uniform sample of at most `cap` of the
examples with activation >= alpha x the neuron's max over the whole corpus (one pass: the shards' candidates
merged, `topk.merge_candidates`; or two: the max from pass 1); plus,
optionally, `per_bin` examples from each of `bins` activation bins below that. Both are exact merges: the result
does not depend on how the corpus was sharded or in which order shards are merged.

Two rules then apply to the merged selection (`finalize`): an entry where the neuron does not fire on the
selected sign (score <= 0) is not an example, so a neuron that never fires has none; and examples whose context
windows are identical token for token (a passage repeated across the corpus) count once per neuron, the
strongest kept, so copies cannot make tight clusters out of one text.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from . import schemas
from .errors import PipelineError
from .storage import load_tensors, provenance, read_parquet, save_tensors
from .topk import empty_entries, merge_candidates, merge_states, merge_stats, score

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


PREFIXES = ("", "quantile.")  # the main set, then the quantile bins


def window_table(corpus_shards: list[str | os.PathLike], window_tokens: int) -> np.ndarray:
    """Every corpus window's token ids as one [windows, window_tokens] array, -1 past a window's end."""
    tables = [read_parquet(path, schemas.WINDOWS).select(["window", "input_ids"]) for path in corpus_shards]
    n_windows = max((int(t.column("window").to_numpy().max()) + 1 for t in tables if t.num_rows), default=0)
    ids = np.full((n_windows, window_tokens), -1, dtype=np.int64)
    for table in tables:
        for window, row in zip(table.column("window").to_pylist(), table.column("input_ids").to_pylist()):
            ids[window, : len(row)] = row
    return ids


def context_ids(tokens: np.ndarray, windows: np.ndarray, before: int, after: int) -> np.ndarray:
    """[entries, before + 1 + after] token ids around each global token (-1 outside its window)."""
    window_tokens = windows.shape[1]
    window, pos = np.divmod(tokens, window_tokens)
    where = pos[:, None] + np.arange(-before, after + 1)[None, :]
    inside = (where >= 0) & (where < window_tokens)
    return np.where(inside, windows[window[:, None], np.clip(where, 0, window_tokens - 1)], -1)


def finalize(
    state: dict[str, torch.Tensor], sign: str, windows: np.ndarray | None, before: int, after: int
) -> dict[str, torch.Tensor]:
    """Drop entries where the neuron does not fire on `sign`, then repeated context windows (per neuron, the
    strongest copy kept; main set before quantile bins). Adds `duplicates`: per neuron, the copies dropped."""
    n_units = state["values"].shape[0]
    found: list[tuple[np.ndarray, ...]] = []
    for order, prefix in enumerate(PREFIXES):
        if f"{prefix}values" not in state:
            continue
        values = state[f"{prefix}values"]
        strength = score(values.double(), sign)
        state = empty_entries(state, prefix, ~(strength > 0) & torch.isfinite(values))
        slot, col = np.nonzero(np.isfinite(state[f"{prefix}values"].numpy()))
        per_neuron = 1 if not prefix else values.shape[0] // n_units
        found.append((np.full(len(slot), order), slot, col, slot // per_neuron, strength.numpy()[slot, col],
                      state[f"{prefix}tokens"].numpy()[slot, col]))
    duplicates = np.zeros(n_units, dtype=np.int32)
    if windows is not None and found:
        order_of, slot, col, neuron, strength, token = (np.concatenate(parts) for parts in zip(*found))
        rank = np.lexsort((token, -strength, order_of, neuron))  # the order the embeddings rank examples in
        keys = np.concatenate([neuron[rank, None], context_ids(token[rank], windows, before, after)], axis=1)
        _, first = np.unique(keys, axis=0, return_index=True)
        copy = np.ones(len(rank), dtype=bool)
        copy[first] = False
        dropped = rank[copy]
        np.add.at(duplicates, neuron[dropped], 1)
        for order, prefix in enumerate(PREFIXES):
            mine = dropped[order_of[dropped] == order]
            if mine.size:
                off = torch.zeros(state[f"{prefix}values"].shape, dtype=torch.bool)
                off[torch.from_numpy(slot[mine]), torch.from_numpy(col[mine])] = True
                state = empty_entries(state, prefix, off)
    return {**state, "duplicates": torch.from_numpy(duplicates)}


def merge_layer(
    shard_paths: list[str | os.PathLike],
    out_path: str | os.PathLike,
    top_k: int,
    layer: int,
    mode: str = "top_k",
    quantile_per_bin: int = 0,
    corpus_shards: list[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """`top_k` is the number kept per neuron: top_k in top_k mode, cap in threshold mode. With `corpus_shards`,
    repeated context windows count once per neuron (see `finalize`)."""
    if mode not in SELECTION_MODES:
        raise PipelineError(f"selection.mode: unknown mode '{mode}' ({', '.join(SELECTION_MODES)})")
    states, metas = _load_layer_states(shard_paths, layer)
    for path, meta in zip(shard_paths, metas):
        if meta["settings"].get("mode", "top_k") != mode:
            raise PipelineError(f"{path}: cached in mode {meta['settings'].get('mode')}, selection asks {mode}")
    first = metas[0]
    settings = first["settings"]
    passes = {int(m["settings"].get("passes", 2)) if mode == "threshold" else 1 for m in metas}
    if len(passes) > 1:
        raise PipelineError(f"{shard_paths[0]}: shards cached with different selection.passes; rerun the caching")
    if mode == "threshold" and passes == {1}:
        merged = merge_candidates(states, top_k, float(settings["alpha"]), settings["sign"])
    else:
        merged = merge_states(states, top_k, quantile_per_bin or None)
    windows = window_table(corpus_shards, int(settings["window_tokens"])) if corpus_shards else None
    merged = finalize(merged, settings.get("sign", "positive"), windows, int(settings.get("context_before", 0)),
                      int(settings.get("context_after", 0)))
    kept = torch.isfinite(merged["values"]).sum().item()
    meta = provenance(
        "selection",
        {"mode": mode, "k": top_k, "quantile_per_bin": quantile_per_bin},
        layer=layer,
        model=first["model"],
        cache_settings=first["settings"],
        shards=[m.get("shard") for m in metas],
        examples=int(kept),
        duplicates_dropped=int(merged["duplicates"].sum()),
    )
    save_tensors({name: t.numpy() for name, t in merged.items()}, out_path, meta)
    return {"tokens": int(merged["n_tokens"][0]), "examples": int(kept), "duplicates": int(merged["duplicates"].sum())}
