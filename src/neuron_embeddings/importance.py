"""Token importance: which tokens of an example's context a neuron needs to fire at the max token.

For an example (a neuron and its max-activating token t), each context token before t, and t itself, is replaced
in turn by the tokenizer's padding token; the model reruns and the drop of the neuron's activation at t is
recorded. Drops are divided by the drop for t itself and clipped to [0, 1] (the paper's normalisation). Where
padding t does not lower the activation, the largest drop is the normaliser instead, and an example whose
activation no padding lowers gets zeros (`normaliser` is then 0).

One forward pass per masked variant, many variants per batch, and variants are shared: the variant "window w
with position p padded" serves every example in window w whose context holds p, for every neuron of the layer
at once, since one pass gives all of the layer's activations. Each variant runs only up to the last max token
it serves (attention is causal) and the model stops after the layer.

Which examples: those the explorer shows (`display_order`: per cluster the central example first, then by
rank), the first `examples_per_cluster` of each of the first `max_clusters` clusters, for the `neurons` most
and least polysemantic neurons of the layer (`metrics.pick_neurons`), or every neuron when `neurons` is None.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from . import schemas
from .adapters import MLPCapture, adapter_for, run_capture
from .errors import PipelineError
from .metrics import pick_neurons
from .models import DTYPES, load_prepared, pick_device
from .storage import check_schema, parquet_provenance, provenance, read_parquet, write_parquet
from .tables import display_order, read_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportanceSettings:
    neurons: int | None = 2  # the N most and N least polysemantic neurons per layer; None: every neuron
    examples_per_cluster: int | None = 1  # the central example first; None: every example the explorer shows
    max_clusters: int | None = None  # clusters shown per neuron (the explorer's max_clusters)
    batch_size: int = 64  # masked variants per forward pass
    device: str = "auto"
    dtype: str = "float32"


def shown_rows(
    clusters: pa.Table, per_cluster: int | None, max_clusters: int | None, neurons: set[int] | None = None
) -> np.ndarray:
    """Row numbers of the examples shown for these neurons (all when None), sorted."""
    neuron = clusters.column("neuron").to_numpy()
    cluster = clusters.column("cluster").to_numpy()
    picked = []
    for rows in display_order(clusters):
        first = rows[0]
        if neurons is not None and int(neuron[first]) not in neurons:
            continue
        if max_clusters is not None and int(cluster[first]) >= max_clusters:
            continue
        picked.append(rows if per_cluster is None else rows[:per_cluster])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def plan_variants(window: np.ndarray, pos: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
    """The masked variants the examples need, shared across examples.

    Example i needs its window unmasked and with each position p in [first_i, pos_i] padded, read at pos_i.
    Returns per variant its window, padded position (-1: none) and length (last position read + 1), and per
    entry (one activation to read) its example, variant and padded position; variants sorted longest first,
    entries grouped per example: its unmasked run, then positions first..pos in order.
    """
    n_masked = pos - first + 1
    example = np.repeat(np.arange(len(pos)), n_masked + 1)
    step = np.arange(len(example)) - np.repeat(np.cumsum(n_masked + 1) - (n_masked + 1), n_masked + 1)
    masked = np.where(step == 0, -1, np.repeat(first, n_masked + 1) + step - 1)  # -1 first: the unmasked run
    span = int(pos.max(initial=0)) + 2
    key = window[example].astype(np.int64) * span + (masked + 1)
    keys, variant = np.unique(key, return_inverse=True)
    length = np.zeros(len(keys), np.int64)
    np.maximum.at(length, variant, pos[example] + 1)
    order = np.lexsort((keys, -length))  # longest first, so a batch pads little; ties by key: deterministic
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return {
        "window": (keys // span)[order],
        "masked": (keys % span - 1)[order],
        "length": length[order],
        "entry_example": example,
        "entry_variant": rank[variant],
        "entry_masked": masked,
    }


def run_variants(
    model: torch.nn.Module,
    layer: int,
    plan: dict[str, np.ndarray],
    input_ids: dict[int, list[int]],
    entry_neuron: np.ndarray,
    entry_pos: np.ndarray,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """The neuron's activation at each entry's position in its variant; one forward pass per batch of variants."""
    adapter = adapter_for(model)
    body = adapter.body(model)
    n_variants = len(plan["length"])
    values = np.zeros(len(entry_neuron), np.float32)
    by_variant = np.argsort(plan["entry_variant"], kind="stable")
    bounds = np.searchsorted(plan["entry_variant"][by_variant], np.arange(0, n_variants + batch_size, batch_size))
    with MLPCapture(model, adapter, [layer], stop_after_last=True) as capture, torch.inference_mode():
        for b, start in enumerate(tqdm(range(0, n_variants, batch_size), desc=f"importance layer {layer}", unit="batch", mininterval=5.0)):
            stop = min(start + batch_size, n_variants)
            width = int(plan["length"][start])
            ids = torch.full((stop - start, width), pad_id, dtype=torch.int64)
            for row, v in enumerate(range(start, stop)):
                length = int(plan["length"][v])
                ids[row, :length] = torch.tensor(input_ids[int(plan["window"][v])][:length], dtype=torch.int64)
                if plan["masked"][v] >= 0:
                    ids[row, int(plan["masked"][v])] = pad_id
            # Right padding and no attention mask: attention is causal, so padding never reaches a read position.
            run_capture(body, ids.to(device))
            entries = by_variant[bounds[b] : bounds[b + 1]]
            act = capture.captured[layer]["act"]
            pick = (
                torch.from_numpy(plan["entry_variant"][entries] - start).to(device),
                torch.from_numpy(entry_pos[entries]).to(device),
                torch.from_numpy(entry_neuron[entries]).to(device),
            )
            values[entries] = act[pick].float().cpu().numpy()
    return values


def normalise(drops: np.ndarray) -> tuple[np.ndarray, float]:
    """Importance from one example's drops (the last is the max token's own): drop / normaliser in [0, 1]."""
    own, largest = float(drops[-1]), float(drops.max(initial=0.0))
    normaliser = own if own > 0 else largest
    if normaliser <= 0:
        return np.zeros_like(drops), 0.0
    return np.clip(drops / normaliser, 0.0, 1.0).astype(np.float32), normaliser


def compute_importance(
    model_dir: str | os.PathLike,
    corpus_shards: list[str | os.PathLike],
    embeddings_path: str | os.PathLike,
    clusters_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layer: int,
    settings: ImportanceSettings,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    emb = read_columns(embeddings_path, schemas.EMBEDDINGS, ["neuron", "example_rank", "token_index", "context_center"])
    clusters = read_parquet(clusters_path, schemas.CLUSTERS)
    if emb.column("neuron").to_pylist() != clusters.column("neuron").to_pylist():
        raise PipelineError(f"{clusters_path}: rows do not match {embeddings_path} (recompute the clusters)")
    neurons = None
    if settings.neurons is not None:
        most, least = pick_neurons(read_parquet(metrics_path, schemas.METRICS), settings.neurons)
        neurons = set(most) | set(least)
    rows = shown_rows(clusters, settings.examples_per_cluster, settings.max_clusters, neurons)
    window_tokens = int(parquet_provenance(embeddings_path)["cache_settings"]["window_tokens"])
    token_index = emb.column("token_index").to_numpy()[rows]
    neuron = emb.column("neuron").to_numpy()[rows]
    pos = token_index % window_tokens
    first = pos - emb.column("context_center").to_numpy()[rows].astype(np.int64)
    plan = plan_variants(token_index // window_tokens, pos, first)

    needed = pa.array(np.unique(plan["window"]), pa.int64())
    input_ids: dict[int, list[int]] = {}
    for shard in corpus_shards:
        table = read_parquet(shard, schemas.WINDOWS).select(["window", "input_ids"])
        table = table.filter(pc.is_in(table.column("window"), needed))
        input_ids.update(zip(table.column("window").to_pylist(), table.column("input_ids").to_pylist()))

    model, tokenizer, info = load_prepared(model_dir, trust_remote_code, up_to_layer=layer)
    device = pick_device(settings.device)
    model.to(device=device, dtype=DTYPES[settings.dtype])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    entry_example = plan["entry_example"]
    start = time.perf_counter()
    values = run_variants(
        model, layer, plan, input_ids, neuron[entry_example].astype(np.int64), pos[entry_example], pad_id,
        settings.batch_size, device,
    )
    seconds = time.perf_counter() - start

    # Entries come per example: the unmasked run, then positions first..pos in order.
    starts = np.cumsum(pos - first + 2) - (pos - first + 2)
    base = values[starts]
    masked_lists, importance_lists, normalisers = [], [], []
    for i, s in enumerate(starts.tolist()):
        masked = values[s + 1 : s + 2 + int(pos[i] - first[i])]
        imp, norm = normalise(base[i] - masked.astype(np.float64))
        masked_lists.append(masked)
        importance_lists.append(imp)
        normalisers.append(norm)
    table = pa.Table.from_pydict(
        {
            "layer": pa.array(np.full(len(rows), layer), pa.int16()),
            "neuron": pa.array(neuron, pa.int32()),
            "example_rank": pa.array(emb.column("example_rank").to_numpy()[rows], pa.int16()),
            "token_index": pa.array(token_index, pa.int64()),
            "activation": pa.array(base, pa.float32()),
            "masked_activations": pa.array(masked_lists, pa.list_(pa.float32())),
            "importance": pa.array(importance_lists, pa.list_(pa.float32())),
            "normaliser": pa.array(normalisers, pa.float32()),
        },
        schema=schemas.IMPORTANCE,
    )
    pad_text = tokenizer.convert_ids_to_tokens(pad_id)
    meta = provenance(
        "importance",
        {"layer": layer, **asdict(settings)},
        model=parquet_provenance(embeddings_path).get("model"),
        pad_token_id=pad_id,
        pad_token=pad_text,
        variants=len(plan["length"]),
    )
    write_parquet(table, out_path, meta)
    tokens = int(plan["length"].sum())
    return {
        "examples": len(rows),
        "neurons": len(np.unique(neuron)),
        "variants": len(plan["length"]),
        "variant_tokens": tokens,
        "forward_seconds": round(seconds, 2),
        "variants_per_second": round(len(plan["length"]) / max(seconds, 1e-9), 1),
        "pad_token": pad_text,
    }
