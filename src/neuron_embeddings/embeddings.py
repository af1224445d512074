"""Neuron embeddings: for each neuron and each of its examples, e = x * w_n (per input projection, concatenated).

sum(e_j) + b_j is the model's pre-activation for projection j at that token, so every row checks itself:
`check_invariant` runs before the file is written and `verify_file` re-checks it from the Parquet alone.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import schemas
from .errors import PipelineError
from .models import layer_input_weights, read_manifest
from .storage import load_tensors, provenance, read_parquet, write_parquet_parts
from .tables import embed, fixed_list, indexed_entries, save_weights
from .vocab import TokenTexts

# Relative tolerance on |sum(e) + b - pre| against sum(|e|): float32 accumulation error is ~1e-7 per term.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def worst_dtype(*dtypes: str) -> str:
    return max(dtypes, key=lambda d: TOLERANCE[d])


def invariant_error(embedding: np.ndarray, biases: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Per row and projection: |sum(e_j) + b_j - pre_j| / (1 + sum |e_j|), summed in float64 (without a float64
    copy of the embeddings: the sums cast as they go)."""
    n_proj = pre.shape[1]
    segments = embedding.reshape(embedding.shape[0], n_proj, -1)
    total = segments.sum(-1, dtype=np.float64) + biases
    scale = 1.0 + np.abs(segments).sum(-1, dtype=np.float64)
    return np.abs(total - pre) / scale


def check_invariant(embedding: np.ndarray, biases: np.ndarray, pre: np.ndarray, dtype: str, where: str,
                    first_row: int = 0) -> float:
    """The worst relative error of rows first_row, first_row + 1, ... (a block of the layer); raises past the
    dtype's tolerance."""
    err = invariant_error(embedding, biases, pre)
    worst = float(err.max()) if err.size else 0.0
    if worst > TOLERANCE[dtype]:
        row, proj = np.unravel_index(int(err.argmax()), err.shape)
        raise PipelineError(
            f"{where}: embedding invariant fails at row {first_row + row}, projection {proj}: relative error {worst:.2e} "
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


def build_embeddings(
    selection_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    corpus_shards: list[str | os.PathLike],
    out_path: str | os.PathLike,
    layer: int,
    trust_remote_code: bool = False,
    weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    units: dict[str, Any] | None = None,
    weights_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Embeddings of the layer's neurons; or, given `weights` (per projection (W [n_units, d], b [n_units]), as
    adapters' input_weights) of other units of the layer (an SAE's latents: sae.model.SparseAutoencoder.unit_weights),
    of those units, described in the provenance by `units`. The model is then read only for its tokenizer.
    `weights_path`: where the units' input weights go, so that the later stages can remake the embedding column
    (tables.Remake) instead of reading it back.

    The embeddings are made, checked and written a block of neurons at a time (one Parquet row group each), from
    the selection's x store: the layer's x * w (1.9 GB for GPT2-small) is never held whole."""
    state, sel_meta = load_tensors(selection_path)
    cache_settings = sel_meta["cache_settings"]
    T = int(cache_settings["window_tokens"])
    before = int(cache_settings["context_before"])
    info = read_manifest(model_dir)
    token_text = TokenTexts(model_dir, trust_remote_code)
    if weights is None:  # this layer's tensors only, read by name: memory for one layer, not the model
        weights = layer_input_weights(model_dir, layer, trust_remote_code)
    entries, store = indexed_entries(state, sel_meta)
    del state
    neuron, x_rows = entries["neuron"], entries["x"]
    matrices = [np.asarray(w.numpy(), np.float32) for w, _ in weights]
    biases = np.stack([b.numpy()[neuron] for _, b in weights], axis=1).astype(np.float32)
    pre = entries["pre"].astype(np.float32)
    tolerance_dtype = worst_dtype(cache_settings.get("dtype", "float32"), cache_settings.get("store_dtype", "float32"))

    n_proj, d_in = len(weights), int(weights[0][0].shape[1])
    schema = schemas.embeddings_schema(n_proj, d_in)
    experts = info.mlp_layout.experts if units is None and info.layout is not None else None
    expert = experts.expert_of(neuron) if experts is not None else None
    n = len(neuron)
    columns = {
        "layer": pa.array(np.full(n, layer), pa.int16()),
        "neuron": pa.array(neuron, pa.int32()),
        "expert": pa.array(expert, pa.int32()) if expert is not None else pa.nulls(n, pa.int32()),
        "example_rank": pa.array(entries["rank"], pa.int16()),
        "sample": pa.array(entries["sample"], pa.string()),
        "token_index": pa.array(entries["token"], pa.int64()),
        **text_columns(entries["token"], entries["context"], read_windows(corpus_shards), T, before, token_text),
        "activation": pa.array(entries["value"], pa.float32()),
        "pre_activations": fixed(pre),
        "biases": fixed(biases),
    }
    rest = pa.Table.from_pydict(columns)
    blocks = neuron_row_blocks(neuron, ROW_GROUP_ROWS)
    # The invariant is checked over the whole layer before anything is written: its worst error goes into the
    # provenance, which Parquet fixes when the writing starts. x * w is recomputed for the writing (cheap).
    worst = 0.0
    for start, stop in blocks:
        rows = slice(start, stop)
        worst = max(worst, check_invariant(embed(store, x_rows[rows], neuron[rows], matrices), biases[rows].astype(np.float64),
                                           pre[rows].astype(np.float64), tolerance_dtype, f"layer {layer}", first_row=start))

    def parts() -> Any:
        for start, stop in blocks:
            part = rest.slice(start, stop - start)
            embedding = embed(store, x_rows[start:stop], neuron[start:stop], matrices)
            yield pa.Table.from_pydict({**{name: part.column(name) for name in part.column_names},
                                        "embedding": fixed(embedding)}, schema=schema)

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
    if weights_path is not None:  # before the table: a table on disk always has its weights beside it
        save_weights(matrices, weights_path, {**meta, "stage": "embedding_weights"})
    write_parquet_parts(parts(), out_path, schema, meta, uncompressed=["embedding"])
    return {"rows": n, "invariant_max_relative_error": worst}


# Rows per row group of the embeddings file (whole neurons), so a reader streams it a block at a time; a block of
# GPT2-small (~25 MB) stays under glibc's largest mmap threshold, so its buffers are reused, not faulted in anew.
ROW_GROUP_ROWS = 8192


def fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    """A 2-D float array as a fixed-size list column (float32)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), a.shape[1])


def neuron_row_blocks(neuron: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive row blocks of at most `rows` rows that never split a neuron (rows sorted by
    neuron); a neuron of more rows is a block of its own."""
    bounds = np.append(np.flatnonzero(np.r_[True, neuron[1:] != neuron[:-1]]), len(neuron)) if len(neuron) else []
    blocks, start = [], 0
    while start < len(neuron):
        stop = int(bounds[np.searchsorted(bounds, start + rows, side="right") - 1])
        if stop <= start:  # one neuron of more than `rows` rows
            stop = int(bounds[np.searchsorted(bounds, start, side="right")])
        blocks.append((start, stop))
        start = stop
    return blocks


def read_windows(corpus_shards: list[str | os.PathLike]) -> dict[str, np.ndarray]:
    """The corpus windows as arrays, sorted by window index: document, doc_start, n_prefix, and their token ids
    flattened (`ids[start[k] : start[k] + length[k]]` for window k)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("window", "document", "doc_start", "n_prefix", "length", "ids")}
    for shard in corpus_shards:
        table = read_parquet(shard, schemas.WINDOWS)
        for name in ("window", "document", "doc_start", "n_prefix"):
            parts[name].append(table.column(name).to_numpy().astype(np.int64))
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        parts["length"].append(np.diff(offsets))
        parts["ids"].append(ids.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64))
    out = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    start = np.concatenate([[0], np.cumsum(out["length"])[:-1]]).astype(np.int64)
    order = np.argsort(out["window"], kind="stable")
    for k in ("window", "document", "doc_start", "n_prefix", "length"):
        out[k] = out[k][order]
    out["start"] = start[order]
    return out


def split_characters(context_ids: np.ndarray, context_code: np.ndarray, offsets: np.ndarray, lone: list[str],
                     text: TokenTexts) -> dict[int, str]:
    """The texts of context tokens that hold part of a character (a byte-level BPE splits CJK, emoji and other
    multi-byte characters over several tokens; each decoded alone is U+FFFD): per flat position, what the token
    adds in its context, i.e. the characters it completes. Each run of such tokens is decoded from the tokens'
    bytes (a byte-level BPE), else a growing prefix at a time; the tokenizer is loaded only when there is a run. A
    token that completes no character gets "" and the one that completes it gets the character, so the context
    reads as the text did. A character the window cuts stays U+FFFD."""
    partial = np.array(["\ufffd" in t for t in lone], bool)
    flagged = partial[context_code] if len(lone) else np.zeros(0, bool)
    if not flagged.any():
        return {}
    # runs of flagged positions, never across two contexts
    at = np.flatnonzero(flagged)
    starts_context = np.zeros(len(flagged) + 1, bool)
    starts_context[offsets] = True
    new_run = np.r_[True, (np.diff(at) != 1) | starts_context[at[1:]]]
    bounds = np.append(np.flatnonzero(new_run), len(at))
    tokenizer = text.tokenizer
    raw = token_bytes(tokenizer, np.unique(context_ids[at]).tolist())
    cache: dict[tuple[int, ...], list[str] | None] = {}
    out: dict[int, str] = {}
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        positions = at[lo:hi]
        run = tuple(int(i) for i in context_ids[positions])
        if run not in cache:
            cache[run] = _completed_from_bytes(run, raw) if raw is not None else _completed_characters(run, tokenizer)
        pieces = cache[run]
        if pieces is not None:
            out.update(zip(positions.tolist(), pieces))
    return out


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE's printable stand-in for each byte (GPT-2's alphabet, which the `tokenizers` ByteLevel
    decoder inverts): printable Latin-1 stands for itself, the other 68 bytes for code points from 256 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(shifted)}}


def token_bytes(tokenizer: Any, ids: list[int]) -> dict[int, bytes] | None:
    """The bytes of these tokens, when the tokenizer is a byte-level BPE whose decoder does nothing else (GPT-2,
    Llama 3, Qwen, SmolLM...); else None (the caller decodes prefixes instead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    alphabet = _byte_alphabet()
    out = {}
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if piece is None or any(c not in alphabet for c in piece):
            return None  # an added token spelled outside the alphabet: not worth a special case
        out[token_id] = bytes(alphabet[c] for c in piece)
    return out


def _completed_from_bytes(run: tuple[int, ...], raw: dict[int, bytes]) -> list[str]:
    """_completed_characters from the tokens' bytes, by an incremental UTF-8 decoder: one pass, no tokenizer."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(raw[token]) for token in run]
    pieces[-1] += decoder.decode(b"", final=True)
    return pieces


def _completed_characters(run: tuple[int, ...], tokenizer: Any) -> list[str] | None:
    """Per token of the run, the characters decoding it adds to the decoded prefix before it (incomplete bytes
    held back until a later token completes them); None when the prefixes do not extend one another."""
    pieces, committed, decoded = [], "", ""
    for end in range(1, len(run) + 1):
        decoded = tokenizer.decode(list(run[:end]))
        stable = decoded.rstrip("\ufffd")
        if not stable.startswith(committed):
            return None
        pieces.append(stable[len(committed):])
        committed = stable
    pieces[-1] += decoded[len(committed):]  # bytes of a character the window cut: kept, as U+FFFD
    return pieces


def text_columns(token_index: np.ndarray, context: np.ndarray, windows: dict[str, np.ndarray], T: int, before: int,
                 text: TokenTexts) -> dict[str, pa.Array]:
    """Per example: its document and position there, the max token (id and text), and the context window's tokens
    and activations, from the first to the last position the selection recorded (finite activation)."""
    window, pos = np.divmod(token_index.astype(np.int64), T)
    k = np.searchsorted(windows["window"], window)
    missing = (k >= len(windows["window"])) | (windows["window"][np.minimum(k, max(len(windows["window"]) - 1, 0))] != window) if len(window) else np.zeros(0, bool)
    if missing.any():
        raise PipelineError(f"example at token {int(token_index[np.argmax(missing)])}: its window is in none of the corpus shards")
    start = windows["start"][k]
    token_id = windows["ids"][start + pos] if len(window) else np.zeros(0, np.int64)
    finite = np.isfinite(context)
    width = context.shape[1] if context.ndim == 2 else 0
    first = np.argmax(finite, axis=1) if width else np.zeros(len(window), np.int64)
    last = width - np.argmax(finite[:, ::-1], axis=1) if width else np.zeros(len(window), np.int64)
    j = np.arange(width)
    keep = (j >= first[:, None]) & (j < last[:, None])
    where = (start + pos - before)[:, None] + j
    context_ids = windows["ids"][where[keep]]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    # Each distinct id decoded once; the columns are then gathers (ids index a table as long as the vocabulary).
    present = np.zeros(int(max(token_id.max(initial=0), context_ids.max(initial=0))) + 1, bool)
    present[token_id] = present[context_ids] = True
    vocab = np.flatnonzero(present)
    code = np.zeros(len(present), np.int32)
    code[vocab] = np.arange(len(vocab), dtype=np.int32)
    lone = [text(int(i)) for i in vocab.tolist()]
    context_code = code[context_ids]
    extra = split_characters(context_ids, context_code, offsets, lone, text)
    center = offsets[:-1].astype(np.int64) + (before - first)
    token_code = code[token_id]
    for flat, piece in extra.items():  # per flat position of the contexts: its text in context
        context_code[flat] = len(lone)
        lone.append(piece)
    inside = center < offsets[1:]
    token_code[inside] = context_code[center[inside]]
    texts = pa.array(lone, pa.string())

    return {
        "document": pa.array(windows["document"][k], pa.int64()),
        "doc_position": pa.array(windows["doc_start"][k] + pos - windows["n_prefix"][k], pa.int32()),
        "token_id": pa.array(token_id, pa.int32()),
        "token": texts.take(pa.array(token_code)),
        "context_tokens": pa.ListArray.from_arrays(pa.array(offsets), texts.take(pa.array(context_code))),
        "context_activations": pa.ListArray.from_arrays(pa.array(offsets), pa.array(context[keep], pa.float32())),
        "context_center": pa.array(before - first, pa.int16()),
    }
