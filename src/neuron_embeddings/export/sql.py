"""DuckDB views over a run's Parquet files: every layer's embeddings, clusters and metrics as one table each, and
two joined views (examples with their clusters; one row per feature cluster). No database is written: the views
read the pipeline's files where they are, so they always show the run as it is.

Paths in the statements are relative to the run folder (results/<run>/): start duckdb there, e.g.
`cd results/<run> && duckdb -init export/duckdb/views.sql` (docs/exports.md has queries over them).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..storage import atomic_path

TABLES = ("embeddings", "clusters", "metrics")
OPTIONAL = ("similar", "importance", "sweep")  # analyses, when the run has them


def _source(table: str, layers: list[int] | None) -> str:
    if layers is None:
        files = f"'{table}/layer-*.parquet'"
    else:
        files = "[" + ", ".join(f"'{table}/layer-{layer}.parquet'" for layer in layers) + "]"
    return f"read_parquet({files}, union_by_name = true)"


def view_statements(layers: list[int] | None = None, optional: tuple[str, ...] = ()) -> str:
    """CREATE VIEW statements for a run: `layers` names its layers' files (None: every layer-*.parquet there);
    `optional` adds views of analyses tables (similar, importance, sweep) by the same name."""
    lines = ["-- DuckDB views of a neuron-embeddings run; paths are relative to results/<run>/.", ""]
    for table in (*TABLES, *optional):
        lines.append(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {_source(table, layers)};")
    lines += [
        "",
        "-- Every example with its cluster (the embedding vectors left out; they stay in the embeddings view).",
        "CREATE OR REPLACE VIEW examples AS",
        "SELECT e.layer, e.neuron, e.example_rank, e.sample, e.token_index, e.document, e.doc_position, e.token_id,",
        "       e.token, e.activation, e.context_tokens, e.context_activations, e.context_center,",
        "       c.cluster, c.cluster_size, c.is_central, c.mean_similarity",
        "FROM embeddings e JOIN clusters c USING (layer, neuron, example_rank);",
        "",
        "-- One row per feature cluster: its size and its central example.",
        "CREATE OR REPLACE VIEW features AS",
        "SELECT layer, neuron, cluster, cluster_size AS size, example_rank AS central_example_rank,",
        "       token AS central_token, activation AS central_activation, context_tokens AS central_context",
        "FROM examples WHERE is_central AND cluster >= 0;",
        "",
    ]
    return "\n".join(lines)


def write_views(out_path: str | os.PathLike, layers: list[int] | None = None, run_dir: str | os.PathLike | None = None) -> dict:
    """Write views.sql; with run_dir, analyses tables that exist there for every layer get views too."""
    optional = ()
    if run_dir is not None and layers:
        optional = tuple(t for t in OPTIONAL if all((Path(run_dir) / t / f"layer-{l}.parquet").is_file() for l in layers))
    text = view_statements(layers, optional)
    with atomic_path(out_path) as tmp:
        tmp.write_text(text)
    return {"views": [*TABLES, *optional, "examples", "features"], "layers": layers, "bytes": len(text.encode())}
