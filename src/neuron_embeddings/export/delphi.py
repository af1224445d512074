"""One layer as a delphi latent cache (EleutherAI/delphi, PyPI eai-delphi), for its explainer and scorers.

delphi reads a cache folder (`raw_dir`) holding one folder per hookpoint; each has a config.json and shards
`{start}_{end}.safetensors` (latents start..end, end included) with three tensors, as delphi's
`LatentCache.save_splits` writes them and `latents/loader.py` (`TensorBuffer.load`) reads them:

- `locations`: [N, 3] (row of `tokens`, position in the row, latent index minus the shard's start), uint16 when
  the rows and the latent offsets fit under 2**16, else uint32 (delphi's rule);
- `activations`: [N] float16, the latent's value there;
- `tokens`: [rows, ctx_len] the token ids of the windows (the same array in every shard of every hookpoint:
  delphi takes its tokens from whichever shard it opens first).

Written here, per layer (`<out>/latents/` is delphi's raw_dir):

    <out>/latents/layers.<L>.mlp/            the neurons as latents (latent = neuron)
    <out>/latents/layers.<L>.mlp.clusters/   the feature clusters as latents (cluster_latents.parquet)
    <out>/cluster_latents.parquet            latent -> (layer, neuron, cluster, cluster_size, central example)
    <out>/windows.parquet                    row of `tokens` -> corpus window (window, document, doc_start)

What a latent's activations are: the neuron's activations over each of its examples' context windows (the
pipeline keeps `context_before` tokens before and `context_after` after the max token, nothing else), in the
direction the example was selected on (a negative example of a gated MLP flipped), zero and below left out as
delphi leaves out a latent that does not fire. A cluster latent has its neuron's activations on that cluster's
examples only. The rows are the corpus windows that hold the layer's examples, not the whole corpus: delphi's
"random" non-activating examples come from the other latents' windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from safetensors.numpy import save_file

from ..errors import PipelineError
from .common import LayerExamples, atomic_dir, folder_size, read_layer, read_windows, write_table

FIRING = 1e-5  # delphi's cache keeps |activation| > 1e-5 (latents/cache.py, get_nonzeros)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def hookpoints(layer: int) -> dict[str, str]:
    return {"neurons": f"layers.{layer}.mlp", "clusters": f"layers.{layer}.mlp.clusters"}


def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's `_generate_split_indices`: linspace boundaries, each (start, end) with end included; never an
    empty split (fewer splits than requested when there are fewer latents)."""
    n = max(1, min(n_splits, width))
    edges = np.linspace(0, width, n + 1).astype(np.int64)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def context_locations(data: LayerExamples, window_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every (example, context position) where the oriented activation fires: example index, row, position, value."""
    acts = data.table.column("context_activations").combine_chunks()
    lengths = pc.list_value_length(acts).to_numpy().astype(np.int64)
    values = acts.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    example = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    token_index = data.column("token_index").astype(np.int64)
    pos = token_index % data.window_tokens
    position = pos[example] - data.column("context_center").astype(np.int64)[example] + offset
    values = values * data.orientation()[example]
    keep = np.isfinite(values) & (values > FIRING)
    if np.any((position[keep] < 0) | (position[keep] >= data.window_tokens)):
        raise PipelineError(f"layer {data.layer}: an example's context runs outside its window (embeddings written by another version?)")
    return {"example": example[keep], "row": window_rows[example[keep]], "position": position[keep],
            "value": np.minimum(values[keep], FLOAT16_MAX)}


def latent_records(locs: dict[str, np.ndarray], latent_of_example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 3] (row, position, latent) int64 and [N] float32, one per distinct (latent, row, position) (examples
    of one latent whose contexts overlap share those tokens: the largest value is kept, they are the same
    neuron's activation), ordered by latent, row, position."""
    latent = latent_of_example[locs["example"]]
    keep = latent >= 0
    loc = np.stack([locs["row"][keep], locs["position"][keep], latent[keep]], axis=1).astype(np.int64)
    value = locs["value"][keep]
    order = np.lexsort((-value, loc[:, 1], loc[:, 0], loc[:, 2]))
    loc, value = loc[order], value[order]
    first = np.ones(len(loc), bool)
    first[1:] = np.any(loc[1:] != loc[:-1], axis=1)
    return loc[first], value[first]


def write_hookpoint(folder: Path, locations: np.ndarray, values: np.ndarray, tokens: np.ndarray, width: int,
                    n_splits: int, config: dict[str, Any]) -> list[str]:
    """config.json and the shards of one hookpoint, as delphi's LatentCache.save_splits and save_config do."""
    folder.mkdir(parents=True)
    shards = []
    for start, end in split_bounds(width, n_splits) if width else []:
        mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
        shard = locations[mask].copy()
        shard[:, 2] -= start
        small = (shard[:, 2].max(initial=0) < 2**16 and shard[:, 0].max(initial=0) < 2**16
                 and shard[:, 1].max(initial=0) < 2**16)
        shard = shard.astype(np.uint16 if small else np.uint32)
        name = f"{start}_{end}.safetensors"
        save_file({"locations": np.ascontiguousarray(shard), "activations": values[mask].astype(np.float16),
                   "tokens": tokens}, str(folder / name))
        shards.append(name)
    (folder / "config.json").write_text(json.dumps({**config, "n_splits": len(shards)}, indent=4) + "\n")
    return shards


def export_delphi_layer(
    embeddings: str | os.PathLike,
    clusters: str | os.PathLike,
    corpus_shards: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    layer: int,
    run: str,
    pad_id: int,
    n_splits: int,
) -> dict[str, Any]:
    """Write `out_dir` (replaced whole) for one layer; returns counts and the size written."""
    data = read_layer(embeddings, clusters, layer)
    token_index = data.column("token_index").astype(np.int64)
    window = token_index // data.window_tokens
    wanted = np.unique(window)
    tokens, windows = read_windows(corpus_shards, wanted, data.window_tokens, pad_id)
    rows = np.searchsorted(wanted, window)
    locs = context_locations(data, rows)

    neuron = data.column("neuron").astype(np.int64)
    cluster = data.column("cluster").astype(np.int64)
    # Cluster latents: every (neuron, cluster >= 0) of the layer, in neuron then cluster order.
    live = cluster >= 0
    pairs = np.unique(np.stack([neuron[live], cluster[live]], axis=1), axis=0) if live.any() else np.zeros((0, 2), np.int64)
    cluster_latent = np.full(len(neuron), -1, np.int64)
    if len(pairs):
        key_pairs = pairs[:, 0] * (cluster.max() + 1) + pairs[:, 1]
        cluster_latent[live] = np.searchsorted(key_pairs, neuron[live] * (cluster.max() + 1) + cluster[live])

    neuron_loc, neuron_val = latent_records(locs, neuron)
    cluster_loc, cluster_val = latent_records(locs, cluster_latent)

    central = data.column("is_central") & live
    central_of = {(int(n), int(c)): i for i, (n, c) in enumerate(zip(neuron[central], cluster[central]))}
    central_rows = [central_of.get((int(n), int(c))) for n, c in pairs]
    ranks = data.column("example_rank")[central]
    tokens_text = data.table.column("token").to_pylist()
    central_index = np.flatnonzero(central)
    mapping = pa.table({
        "latent": pa.array(np.arange(len(pairs)), pa.int64()),
        "layer": pa.array(np.full(len(pairs), layer), pa.int16()),
        "neuron": pa.array(pairs[:, 0], pa.int32()),
        "cluster": pa.array(pairs[:, 1], pa.int32()),
        "cluster_size": pa.array(np.bincount(cluster_latent[live], minlength=len(pairs)), pa.int32()),
        "central_example_rank": pa.array([int(ranks[i]) if i is not None else None for i in central_rows], pa.int16()),
        "central_token": pa.array([tokens_text[central_index[i]] if i is not None else None for i in central_rows], pa.string()),
        "locations": pa.array(np.bincount(cluster_loc[:, 2], minlength=len(pairs)) if len(pairs) else [], pa.int64()),
    })

    batch = data.cache_settings.get("batch_size")
    base = {
        # delphi's CacheConfig fields (informational for a finished cache; delphi reads model_name for a tokenizer)
        "dataset_repo": f"results/{run}/corpus",
        "dataset_split": "",
        "dataset_name": "",
        "dataset_column": "text",
        "batch_size": batch if isinstance(batch, int) else 0,  # 0: "auto" (sized to the GPU)
        "cache_ctx_len": data.window_tokens,
        "n_tokens": int(tokens.size),
        "model_name": str(data.model.get("source", "")),
        "ctx_len": data.window_tokens,
    }
    names = hookpoints(layer)
    with atomic_dir(out_dir) as tmp:
        latents = tmp / "latents"
        info = {"run": run, "layer": layer, "rows": "windows.parquet", "values": "the neuron's activation, in the "
                "direction each example was selected on; context windows of the pipeline's examples only"}
        shards = {
            names["neurons"]: write_hookpoint(latents / names["neurons"], neuron_loc, neuron_val, tokens, data.n_units,
                                              n_splits, {**base, "neuron_embeddings": {**info, "latents": "neurons",
                                                                                       "width": data.n_units}}),
            names["clusters"]: write_hookpoint(latents / names["clusters"], cluster_loc, cluster_val, tokens, len(pairs),
                                               n_splits, {**base, "neuron_embeddings": {**info, "latents": "clusters",
                                                          "width": int(len(pairs)), "map": "cluster_latents.parquet"}}),
        }
        write_table(mapping, tmp / "cluster_latents.parquet")
        write_table(windows.append_column("row", pa.array(np.arange(windows.num_rows), pa.int64())),
                    tmp / "windows.parquet")
        size = folder_size(tmp)
    return {
        "layer": layer, "examples": int(len(neuron)), "windows": int(len(wanted)), "neuron_latents": data.n_units,
        "cluster_latents": int(len(pairs)), "neuron_locations": int(len(neuron_loc)),
        "cluster_locations": int(len(cluster_loc)), "shards": shards, "bytes": size,
    }
