"""The pipeline's per-layer files, read back by the later stages: the embeddings table (whole, some columns, or
streamed a few whole neurons at a time), per embeddings row where its x is in the selection's stores, and each
cluster's examples in display order.

Readers only: the stages that write these files own their contents (schemas.py fixes the columns).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .errors import PipelineError
from .storage import check_schema, load_tensors, read_parquet, save_tensors


def fixed_list(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list column as a 2-D array (rows x width)."""
    array = column.combine_chunks()
    width = array.type.list_size
    return array.values.to_numpy(zero_copy_only=False).reshape(len(array), width)


def read_embeddings(path: str | os.PathLike) -> tuple[pa.Table, np.ndarray]:
    """The embeddings table (without the embedding column) and the embeddings as a float32 matrix."""
    table = read_parquet(path, schemas.EMBEDDINGS)
    emb = fixed_list(table.column("embedding")) if table.num_rows else np.zeros((0, 0), np.float32)
    return table.drop_columns(["embedding"]), emb


BLOCK_ROWS = 8192  # rows read at a time when streaming: ~25 MB of GPT2-small embeddings (embeddings.ROW_GROUP_ROWS)


def neuron_blocks(path: str | os.PathLike, columns: list[str], rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """The embeddings table's `columns` (`neuron` among them) in consecutive pieces of about `rows` rows, each
    holding whole neurons: a stage that works neuron by neuron never holds the layer (a GPT2-small layer's
    embedding column is ~1.9 GB). The table is sorted by neuron; a piece ends before the neuron that the read
    cut, which then starts the next one. Nothing is yielded for an empty table."""
    try:
        reader = pq.ParquetFile(path)  # not memory-mapped: the pages read would count as resident, up to the file
    except (OSError, pa.ArrowInvalid) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from None
    check_schema(reader.schema_arrow, schemas.EMBEDDINGS, path)
    try:
        carry: pa.Table | None = None
        # one row group at a time: asked for them all, the reader buffers ahead, up to the whole file
        batches = (batch for group in range(reader.num_row_groups)
                   for batch in reader.iter_batches(batch_size=rows, row_groups=[group], columns=columns))
        for batch in batches:
            if not batch.num_rows:
                continue
            piece = pa.Table.from_batches([batch])
            if carry is not None and carry.num_rows:
                piece = pa.concat_tables([carry, piece])
            neuron = piece.column("neuron").to_numpy()
            cut = int(np.searchsorted(neuron, neuron[-1], side="left"))
            if cut:
                yield piece.slice(0, cut)
            carry = piece.slice(cut)
        if carry is not None and carry.num_rows:
            yield carry
    except (OSError, pa.ArrowInvalid) as exc:  # a file cut short past its footer fails here
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from None


def block_embeddings(piece: pa.Table) -> np.ndarray:
    """A streamed piece's embedding column as a float32 matrix (rows x width)."""
    if not piece.num_rows:
        return np.zeros((0, piece.schema.field("embedding").type.list_size), np.float32)
    return fixed_list(piece.column("embedding"))


def embed(store: np.ndarray, x_rows: np.ndarray, neuron: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """The neuron embeddings x * w of some rows: per projection, concatenated (float32). `x_rows` index the
    selection's x stores, `matrices` are the units' input weights per projection ([units, d]); rows sorted by
    neuron, so each neuron's weights multiply its rows as one broadcast (no per-row copy of w)."""
    d = store.shape[1]
    out = np.empty((len(x_rows), d * len(matrices)), np.float32)
    x = store[x_rows]
    bounds = np.append(np.flatnonzero(np.r_[True, neuron[1:] != neuron[:-1]]), len(neuron)) if len(neuron) else [0]
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for j, w in enumerate(matrices):
            np.multiply(x[start:stop], w[neuron[start]], out=out[start:stop, j * d : (j + 1) * d])
    return out


class Remake:
    """A layer's embedding column, remade from what it was made of: each row's x (the selection's x stores) times
    its unit's input weights (the file the embeddings stage writes beside the table). The same float32 products,
    so the same numbers; the stages that stream the embeddings use it because Parquet decodes a list column of
    768 floats a row at ~0.3 GB/s (6-8 s for a GPT2-small layer) and the remake takes ~1.5 s."""

    def __init__(self, selection_path: str | os.PathLike, weights_path: str | os.PathLike):
        self.weights_path = weights_path
        self.x_rows, self.store = store_rows(selection_path)
        tensors, _ = load_tensors(weights_path)
        names = sorted((k for k in tensors if k.startswith("weight.")), key=lambda k: int(k.split(".")[1]))
        self.matrices = [np.asarray(tensors[k], np.float32) for k in names]
        if not self.matrices or any(m.ndim != 2 or m.shape[1] != self.store.shape[1] for m in self.matrices):
            raise PipelineError(f"{weights_path}: no input weights of width {self.store.shape[1]} (the x stores of "
                                f"{selection_path}): delete it to recompute the embeddings")

    def rows(self, start: int, stop: int, neuron: np.ndarray) -> np.ndarray:
        return embed(self.store, self.x_rows[start:stop], neuron, self.matrices)


def save_weights(matrices: list[np.ndarray], path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """The units' input weights an embeddings table was made with, for Remake."""
    save_tensors({f"weight.{j}": np.asarray(m, np.float32) for j, m in enumerate(matrices)}, path, meta)


def remake_from(selection_path: str | os.PathLike | None, weights_path: str | os.PathLike | None) -> Remake | None:
    """A Remake when both files are given (the workflow gives them); else None: the column is read."""
    return Remake(selection_path, weights_path) if selection_path is not None and weights_path is not None else None


def embedding_blocks(path: str | os.PathLike, columns: list[str], remake: Remake | None = None,
                     rows: int = BLOCK_ROWS) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """neuron_blocks' pieces of the embeddings table (`columns`, `neuron` among them, not `embedding`) with their
    embeddings as a float32 matrix: read from the table, or remade (`remake`). A remake is checked first against
    the table's first row group, and must cover every row."""
    if remake is None:
        for piece in neuron_blocks(path, list(columns) + ["embedding"], rows):
            yield piece.drop_columns(["embedding"]), block_embeddings(piece)
        return
    _check_remake(path, remake)
    offset = 0
    for piece in neuron_blocks(path, list(columns), rows):
        yield piece, remake.rows(offset, offset + piece.num_rows, piece.column("neuron").to_numpy())
        offset += piece.num_rows
    if offset != len(remake.x_rows):
        raise PipelineError(f"{path}: {offset} rows, but its selection has {len(remake.x_rows)} examples: "
                            f"delete it to recompute the embeddings")


def _check_remake(path: str | os.PathLike, remake: Remake) -> None:
    try:
        reader = pq.ParquetFile(path)
        if not reader.metadata.num_rows:
            return
        first = reader.read_row_group(0, columns=["neuron", "embedding"])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from None
    stored = block_embeddings(first)
    if first.num_rows > len(remake.x_rows) or not np.array_equal(
            remake.rows(0, first.num_rows, first.column("neuron").to_numpy()), stored):
        raise PipelineError(f"{remake.weights_path}: does not remake the embeddings of {path} (from another run?): "
                            f"delete both to recompute them")


def selected_entries(state: dict[str, np.ndarray], mode: str, sign: str = "positive") -> dict[str, np.ndarray]:
    """Every kept example of a selection file, main set and quantile bins together, ordered by neuron and then
    by the selection's score of the activation (descending; ties by token), with x gathered from each set's store."""
    parts = []
    for prefix, label in (("", mode), ("quantile.", "quantile")):
        if f"{prefix}values" not in state:
            continue
        values = state[f"{prefix}values"]
        slot, col = np.nonzero(np.isfinite(values))
        per_neuron = 1 if not prefix else values.shape[0] // state["values"].shape[0]
        sample = [label] * len(slot) if not prefix else [f"quantile-{b}" for b in (slot % per_neuron).tolist()]
        parts.append({
            "neuron": slot // per_neuron,
            "value": values[slot, col],
            "token": state[f"{prefix}tokens"][slot, col],
            "pre": state[f"{prefix}pre"][slot, col],
            "context": state[f"{prefix}context"][slot, col],
            "x": state[f"{prefix}x"][state[f"{prefix}xrow"][slot, col]].astype(np.float32),
            "sample": np.array(sample, dtype=object),
        })
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    value = joined["value"].astype(np.float64)
    strength = {"positive": value, "negative": -value, "both": np.abs(value)}[sign]
    order = np.lexsort((joined["token"], -strength, joined["neuron"]))
    joined = {key: value[order] for key, value in joined.items()}
    starts = np.searchsorted(joined["neuron"], joined["neuron"], side="left")
    joined["rank"] = np.arange(len(order)) - starts
    return joined


def store_rows(selection_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Per embeddings row (same order), its row in the selection's x stores, and the stores joined."""
    state, meta = load_tensors(selection_path)
    entries, store = indexed_entries(state, meta)
    return entries["x"], store


def indexed_entries(state: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`selected_entries` of a selection file with `x` replaced by each example's row in the x stores, and the
    stores joined (float32).

    `selected_entries` fixes the row order; handing it the row numbers in place of x gives, per
    example, where its x is, without materialising x for every example (a GPT2-small layer: 1.9 GB). It gathers
    x as float32, exact for integers below 2**24 only, so a row number travels as two such digits.
    """
    mode = meta.get("settings", {}).get("mode", "top_k")
    indexed, stores, offset = dict(state), [], 0
    for prefix in ("", "quantile."):
        if f"{prefix}x" in state:
            store = state[f"{prefix}x"]
            number = np.arange(len(store), dtype=np.int64) + offset
            indexed[f"{prefix}x"] = np.stack([number >> 24, number & (2**24 - 1)], axis=1).astype(np.float32)
            stores.append(store)
            offset += len(store)
    sign = meta.get("cache_settings", {}).get("sign", "positive")
    entries = selected_entries(indexed, mode, sign)
    digits = entries["x"].astype(np.int64)
    entries["x"] = (digits[:, 0] << 24) | digits[:, 1]
    return entries, np.concatenate(stores).astype(np.float32, copy=False)


def read_columns(path: str | os.PathLike, expected: pa.Schema, columns: list[str]) -> pa.Table:
    """Some columns of a pipeline table (the embeddings' embedding column is large), schema-checked."""
    check_schema(pq.read_schema(path), expected, path)
    return pq.read_table(path, columns=columns)


def display_order(clusters: pa.Table) -> list[np.ndarray]:
    """Per (neuron, cluster) in order, the clusters table's row numbers as shown: central first, then by rank.

    The clusters table is sorted by neuron then example_rank, and clusters are numbered largest first. A dead
    unit's examples (cluster -1: no clusters) are not shown.
    """
    neuron = clusters.column("neuron").to_numpy()
    cluster = clusters.column("cluster").to_numpy()
    rank = clusters.column("example_rank").to_numpy()
    central = clusters.column("is_central").to_numpy(zero_copy_only=False)
    order = np.lexsort((rank, ~central, cluster, neuron))
    order = order[cluster[order] >= 0]
    key = neuron[order].astype(np.int64) * (int(cluster.max(initial=0)) + 1) + cluster[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    return np.split(order, starts[1:]) if len(key) else []
