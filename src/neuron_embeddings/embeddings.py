"""Neuron embeddings: for each neuron and each of its examples, e = x * w_n (per input projection, concatenated).

sum(e_j) + b_j is the model's pre-activation for projection j at that token, so every row checks itself:
`check_invariant` runs before the file is written and `verify_file` re-checks it from the Parquet alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import schemas
from .errors import PipelineError
from .models import layer_input_weights, load_tokenizer, read_manifest
from .storage import load_tensors, provenance, read_parquet, write_parquet
from .tables import fixed_list, selected_entries

# Relative tolerance on |sum(e) + b - pre| against sum(|e|): float32 accumulation error is ~1e-7 per term.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def worst_dtype(*dtypes: str) -> str:
    return max(dtypes, key=lambda d: TOLERANCE[d])


def invariant_error(embedding: np.ndarray, biases: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Per row and projection: |sum(e_j) + b_j - pre_j| / (1 + sum |e_j|)."""
    n_proj = pre.shape[1]
    segments = embedding.astype(np.float64).reshape(embedding.shape[0], n_proj, -1)
    total = segments.sum(-1) + biases
    scale = 1.0 + np.abs(segments).sum(-1)
    return np.abs(total - pre) / scale


def check_invariant(embedding: np.ndarray, biases: np.ndarray, pre: np.ndarray, dtype: str, where: str) -> float:
    err = invariant_error(embedding, biases, pre)
    worst = float(err.max()) if err.size else 0.0
    if worst > TOLERANCE[dtype]:
        row, proj = np.unravel_index(int(err.argmax()), err.shape)
        raise PipelineError(
            f"{where}: embedding invariant fails at row {row}, projection {proj}: relative error {worst:.2e} "
            f"> {TOLERANCE[dtype]:.0e} (sum(x*w)+b differs from the model's pre-activation)"
        )
    return worst


def verify_file(path: str | os.PathLike) -> float:
    """Re-check the invariant from an embeddings Parquet alone; return the worst relative error."""
    from .storage import parquet_provenance

    table = read_parquet(path, schemas.EMBEDDINGS)
    cache = parquet_provenance(path).get("cache_settings", {})
    dtype = worst_dtype(cache.get("dtype", "float32"), cache.get("store_dtype", "float32"))
    if table.num_rows == 0:
        return 0.0
    emb = fixed_list(table.column("embedding"))
    biases = fixed_list(table.column("biases")).astype(np.float64)
    pre = fixed_list(table.column("pre_activations")).astype(np.float64)
    return check_invariant(emb, biases, pre, dtype, str(path))


class TokenText:
    """Decoded text per token id, cached (the same ids recur across neurons)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def build_embeddings(
    selection_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    corpus_shards: list[str | os.PathLike],
    out_path: str | os.PathLike,
    layer: int,
    trust_remote_code: bool = False,
    weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    units: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embeddings of the layer's neurons; or, given `weights` (per projection (W [n_units, d], b [n_units]), as
    adapters' input_weights) of other units of the layer (an SAE's latents: sae.model.SparseAutoencoder.unit_weights),
    of those units, described in the provenance by `units`. The model is then read only for its tokenizer."""
    state, sel_meta = load_tensors(selection_path)
    cache_settings = sel_meta["cache_settings"]
    T = int(cache_settings["window_tokens"])
    before = int(cache_settings["context_before"])
    info = read_manifest(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    if weights is None:  # this layer's tensors only, read by name: memory for one layer, not the model
        weights = layer_input_weights(model_dir, layer, trust_remote_code)

    entries = selected_entries(state, sel_meta["settings"].get("mode", "top_k"), cache_settings.get("sign", "positive"))
    neuron, x = entries["neuron"], entries["x"].astype(np.float32)
    segments = [x * w.numpy()[neuron] for w, _ in weights]
    embedding = np.concatenate(segments, axis=1).astype(np.float32)
    biases = np.stack([b.numpy()[neuron] for _, b in weights], axis=1).astype(np.float32)
    pre = entries["pre"].astype(np.float32)
    tolerance_dtype = worst_dtype(cache_settings.get("dtype", "float32"), cache_settings.get("store_dtype", "float32"))
    worst = check_invariant(embedding, biases.astype(np.float64), pre.astype(np.float64), tolerance_dtype, f"layer {layer}")

    windows: dict[int, tuple[int, int, int, list[int]]] = {}
    docs = {}
    for shard in corpus_shards:
        table = read_parquet(shard, schemas.WINDOWS)
        for w, d, s, p, ids in zip(*(table.column(c).to_pylist() for c in ("window", "document", "doc_start", "n_prefix", "input_ids"))):
            windows[w] = (d, s, p, ids)
    token_index, rank, context = entries["token"], entries["rank"], entries["context"]
    text = TokenText(tokenizer)
    rows: dict[str, list] = {name: [] for name in ("document", "doc_position", "token_id", "token", "context_tokens", "context_activations", "context_center")}
    for i, tok in enumerate(token_index.tolist()):
        window, pos = divmod(tok, T)
        document, doc_start, n_prefix, ids = windows[window]
        finite = np.isfinite(context[i])
        first = int(np.argmax(finite))
        last = len(finite) - int(np.argmax(finite[::-1]))
        ctx_positions = range(pos - before + first, pos - before + last)
        rows["document"].append(document)
        rows["doc_position"].append(doc_start + pos - n_prefix)
        rows["token_id"].append(ids[pos])
        rows["token"].append(text(ids[pos]))
        rows["context_tokens"].append([text(ids[p]) for p in ctx_positions])
        rows["context_activations"].append(context[i, first:last].tolist())
        rows["context_center"].append(before - first)

    n_proj, d_in = len(weights), int(weights[0][0].shape[1])
    schema = schemas.embeddings_schema(n_proj, d_in)

    def fixed(a: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), a.shape[1])

    experts = info.mlp_layout.experts if units is None and info.layout is not None else None
    expert = experts.expert_of(neuron) if experts is not None else None
    columns = {
        "layer": pa.array(np.full(len(neuron), layer), pa.int16()),
        "neuron": pa.array(neuron, pa.int32()),
        "expert": pa.array(expert, pa.int32()) if expert is not None else pa.nulls(len(neuron), pa.int32()),
        "example_rank": pa.array(rank, pa.int16()),
        "sample": pa.array(entries["sample"], pa.string()),
        "token_index": pa.array(token_index, pa.int64()),
        "document": pa.array(rows["document"], pa.int64()),
        "doc_position": pa.array(rows["doc_position"], pa.int32()),
        "token_id": pa.array(rows["token_id"], pa.int32()),
        "token": pa.array(rows["token"], pa.string()),
        "activation": pa.array(entries["value"], pa.float32()),
        "pre_activations": fixed(pre),
        "biases": fixed(biases),
        "embedding": fixed(embedding),
        "context_tokens": pa.array(rows["context_tokens"], pa.list_(pa.string())),
        "context_activations": pa.array(rows["context_activations"], pa.list_(pa.float32())),
        "context_center": pa.array(rows["context_center"], pa.int16()),
    }
    table = pa.Table.from_pydict(columns, schema=schema)
    meta = provenance(
        "embeddings",
        {"layer": layer},
        model=sel_meta["model"],
        cache_settings=cache_settings,
        selection=sel_meta["settings"],
        projections=info.projections if units is None else units.get("projections", ["units"]),
        d_model=d_in,
        invariant_max_relative_error=worst,
        **({"units": units} if units is not None else {}),
    )
    write_parquet(table, out_path, meta)
    return {"rows": table.num_rows, "invariant_max_relative_error": worst}
