"""What the SAE stages that run the language model share: the model loaded up to a layer, the settings its MLP
activations are streamed with, and the corpus windows held out from training (on which the quality is measured)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import schemas
from ..activations import CacheSettings, check_layers
from ..errors import PipelineError
from ..models import DTYPES, load_prepared, pick_device, read_manifest
from ..storage import read_parquet


def stream_settings(window_tokens: int, compute: dict[str, Any]) -> CacheSettings:
    """The caching settings of a plain stream of MLP activations (no examples kept), from the rule's compute
    params (config key activations)."""
    return CacheSettings(top_k=1, context_before=0, context_after=0, window_tokens=window_tokens,
                         batch_size=compute["batch_size"], device=compute["device"], dtype=compute["dtype"])


def load_model(model_dir, layers: list[int], device_name: str, dtype: str, trust_remote_code: bool,
               whole: bool = False):
    """The model on its device; only its blocks up to the deepest of `layers` unless the whole model is needed
    (the LM loss of the evaluation)."""
    info = read_manifest(model_dir)
    check_layers(layers, info.n_layers, info.architecture)
    model, tokenizer, info = load_prepared(model_dir, trust_remote_code, up_to_layer=None if whole else max(layers))
    device = pick_device(device_name)
    model.to(device=device, dtype=DTYPES[dtype])
    return model, tokenizer, info, device


def shard_name(path: str | os.PathLike) -> str:
    return Path(path).stem.replace("shard-", "")


def _window_sizes(shard_paths: list[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """(window ids, real tokens per window: BOS not counted) over the shards, in window order."""
    ids, sizes = [], []
    for path in shard_paths:
        table = read_parquet(path, schemas.WINDOWS)
        ids.append(table.column("window").to_numpy())
        lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()], dtype=np.int64)
        sizes.append(lengths - table.column("n_prefix").to_numpy().astype(np.int64))
    ids_all, sizes_all = np.concatenate(ids), np.concatenate(sizes)
    order = np.argsort(ids_all, kind="stable")
    return ids_all[order], sizes_all[order]


def held_out_windows(shard_paths: list[str | os.PathLike], eval_tokens: int, seed: int) -> np.ndarray:
    """The corpus windows held out from SAE training, on which its quality is measured: a seeded random sample of
    whole windows, drawn until they hold `eval_tokens` tokens (BOS not counted). Sorted window ids."""
    ids_all, sizes_all = _window_sizes(shard_paths)
    picked = np.random.default_rng(seed).permutation(len(ids_all))
    count = int(np.searchsorted(np.cumsum(sizes_all[picked]), eval_tokens) + 1) if eval_tokens > 0 else 0
    if count >= len(ids_all) and eval_tokens > 0:
        raise PipelineError(f"sae.eval_tokens: {eval_tokens} held-out tokens would leave nothing to train on "
                            f"(the corpus has {int(sizes_all.sum())} tokens)")
    return np.sort(ids_all[picked[:count]])


def real_tokens(shard_paths: list[str | os.PathLike], windows: np.ndarray | None = None) -> int:
    """Real tokens (BOS not counted) in the given windows of the shards, or in all of them."""
    ids, sizes = _window_sizes(shard_paths)
    return int(sizes.sum() if windows is None else sizes[np.isin(ids, windows)].sum())
