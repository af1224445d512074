"""Writing outputs so that no half-written file is ever taken for a finished one, and reading them safely.

Every file is written under a temporary name in the same directory and renamed into place, so a killed job
leaves either the previous file or nothing. Tensors go through safetensors (never pickle); tables through
Parquet with the provenance in the key-value metadata.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from . import __version__
from .errors import PipelineError

PROVENANCE_KEY = b"neuron_embeddings.provenance"
_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(_UMASK)


def usual_mode(base: int = 0o666) -> int:
    """The permissions a plain open() would give (mkstemp/mkdtemp make their files private)."""
    return base & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes.

    A write that fails (disk full, quota, I/O error) raises a one-line PipelineError naming the file and leaves
    `path` as it was. Temporaries of `path` left by a killed earlier attempt are removed first (one job writes a
    given output at a time, so they belong to no live writer).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        os.chmod(tmp_name, usual_mode())  # mkstemp makes it private; the output gets the usual permissions
    except OSError as exc:
        raise PipelineError(f"{final}: cannot write here ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except PipelineError:
            raise
        except Exception as exc:  # pyarrow raises OSError, safetensors its own type; both name the OS error
            if not isinstance(exc, OSError) and "os error" not in str(exc):
                raise
            errno = getattr(exc, "errno", None)
            reason = os.strerror(errno) if errno else str(exc).splitlines()[0]
            raise PipelineError(f"{final}: write failed, nothing written ({reason})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the settings that produced an output (recorded, never used as a trigger)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance(stage: str, settings: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "package_version": __version__,
        "settings": dict(settings),
        "settings_hash": settings_hash(settings),
        **extra,
    }


def write_parquet(table: pa.Table, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, PROVENANCE_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_parquet_parts(
    parts: Iterable[pa.Table],
    path: str | os.PathLike,
    schema: pa.Schema,
    meta: Mapping[str, Any],
    uncompressed: Iterable[str] = (),
) -> None:
    """Write a table made piece by piece, one row group per piece, so that it is never held whole. Columns named
    in `uncompressed` are stored plain (no compression, dictionary or statistics): zstd gains ~7% on float
    embeddings and costs seconds per GB, writing and reading."""
    plain = set(uncompressed)
    # Per-column settings name Parquet's leaf columns ("embedding.list.element"), not the Arrow fields
    leaves = leaf_columns(schema)
    codecs = {leaf: "none" if leaf.split(".")[0] in plain else "zstd" for leaf in leaves}
    packed = [leaf for leaf in leaves if leaf.split(".")[0] not in plain]
    # The provenance goes in with the schema: Arrow readers take a file's metadata from the schema it stores.
    schema = schema.with_metadata({**(schema.metadata or {}), PROVENANCE_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression=codecs, use_dictionary=packed, write_statistics=packed) as writer:
            for part in parts:
                writer.write_table(part.replace_schema_metadata(schema.metadata), row_group_size=max(part.num_rows, 1))


def leaf_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf column paths of an Arrow schema, as the writer's per-column settings name them."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)  # Arrow has no public mapping; an empty file's metadata has it
    parquet_schema = pq.read_metadata(pa.BufferReader(sink.getvalue())).schema
    return [parquet_schema.column(i).path for i in range(len(parquet_schema))]


def read_parquet(path: str | os.PathLike, expected: pa.Schema | None = None) -> pa.Table:
    """Read a table, checking it against the schema this version writes (names and types)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from None
    if expected is not None:
        check_schema(table.schema, expected, path)
    return table


def check_schema(actual: pa.Schema, expected: pa.Schema, path: str | os.PathLike) -> None:
    for field in expected:
        index = actual.get_field_index(field.name)
        if index < 0:
            raise PipelineError(
                f"{path}: column '{field.name}' is missing (written by another version? delete it to recompute)"
            )
        got = actual.field(index).type
        if not _same_type(got, field.type):
            raise PipelineError(f"{path}: column '{field.name}' has type {got}, expected {field.type}")


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    # Fixed-size lists have a per-file width (d_model differs by model), so only the value type is fixed.
    if pa.types.is_fixed_size_list(want):
        return pa.types.is_fixed_size_list(got) and got.value_type == want.value_type
    return got.equals(want)


def parquet_provenance(path: str | os.PathLike) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def save_tensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"provenance": json.dumps(meta, default=str)})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {}).get("provenance", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise PipelineError(f"{path}: not a readable safetensors file ({exc}); delete it to recompute") from None


def write_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
