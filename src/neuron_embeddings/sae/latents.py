"""The SAE's latents through the neurons' caching: one forward pass per corpus shard turns the layer's MLP
activations h into the SAE's input x = h - b_dec, its pre-activations and latent activations, and feeds them to
the neurons' accumulators (topk.py): pass-1 statistics (threshold selection) or the selected examples, in the files
and layout the neurons' caching writes, so selection.merge_layer merges them."""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from ..activations import CacheSettings, StatsOnly, stream_shard
from ..errors import PipelineError
from ..models import DTYPES
from ..selection import PREFIXES
from ..storage import load_tensors, provenance, save_tensors
from ..topk import OnePassAccumulator, ThresholdAccumulator, TopKAccumulator, empty_entries
from .model import SparseAutoencoder, check_fits
from .saelens_io import load_sae
from .streaming import load_model


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
    for prefix in PREFIXES:
        if f"{prefix}values" in state:
            state = empty_entries(state, prefix, ~(state[f"{prefix}values"] > 0))
    return state


def cache_sae_shard(
    model_dir: str | os.PathLike,
    shard_path: str | os.PathLike,
    saes: dict[str, tuple[int, str | os.PathLike]],
    out_paths: dict[str, str | os.PathLike],
    settings: CacheSettings,
    *,
    shard: str,
    trust_remote_code: bool,
    stats_only: bool,
    stats_paths: dict[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """One corpus shard through the model (once, up to the deepest SAE's layer) for every SAE: per SAE, either
    pass-1 statistics of its latents (stats_only) or its latents' selected examples, in the files and layout the
    neurons' caching writes (activations.stats_shard / cache_shard), so selection.merge_layer merges them. In
    threshold mode (not stats_only) `stats_paths` gives each SAE's merged pass-1 statistics."""
    layers = sorted({layer for layer, _ in saes.values()})
    model, tokenizer, info, device = load_model(model_dir, layers, settings.device, settings.dtype, trust_remote_code)
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
        elif settings.mode == "threshold" and settings.passes == 1:
            acc = OnePassAccumulator(sae.d_sae, sae.d_in, 1, settings.alpha, settings.cap, before, after, settings.seed,
                                     settings.histogram_stride, DTYPES[settings.store_dtype])
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
