"""The exports of a finished run folder without Snakemake (`neuron-embeddings export results/<run> ...`): the
same functions as the workflow's export rules, over the layers the folder holds."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from . import FORMATS

SCHEMA = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


def schema_defaults() -> dict[str, Any]:
    """The export settings' defaults, from the config schema (the one place they are written)."""
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    properties = schema["properties"]["export"]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def run_layers(run_dir: Path, tables: tuple[str, ...]) -> list[int]:
    """The layers for which every one of `tables` has its layer-<L>.parquet in the run folder."""
    found = None
    for table in tables:
        layers = {int(m.group(1)) for p in (run_dir / table).glob("layer-*.parquet")
                  if (m := re.fullmatch(r"layer-(\d+)\.parquet", p.name))}
        found = layers if found is None else found & layers
    return sorted(found or ())


def corpus_shards_of(run_dir: Path, corpus_dir: str | os.PathLike | None = None) -> list[Path]:
    """The run's corpus shards: <run>/corpus, or for another model of a run (<run>/models/<name>) sharing the
    reference model's tokenizer, the run's own corpus."""
    candidates = [Path(corpus_dir)] if corpus_dir else [run_dir / "corpus", run_dir.parent.parent / "corpus"]
    for folder in candidates:
        shards = sorted(folder.glob("shard-*.parquet"))
        if shards:
            return shards
    raise PipelineError(f"{run_dir}: no corpus shards found (looked in {', '.join(map(str, candidates))}; use --corpus)")


def run_name(run_dir: Path) -> str:
    if run_dir.parent.name == "models":
        return f"{run_dir.parent.parent.name}/models/{run_dir.name}"
    return run_dir.name


def export_run(
    run_dir: str | os.PathLike,
    formats: list[str],
    out_dir: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    layers: list[int] | None = None,
    corpus_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Export a finished run folder in each of `formats` into out_dir (default <run>/export), laid out as the
    workflow lays it: delphi/layer-<L>/, neuronpedia/layer-<L>/, duckdb/views.sql."""
    run_dir = Path(run_dir)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise PipelineError(f"unknown export format {', '.join(unknown)} (known: {', '.join(FORMATS)})")
    if not (run_dir / "embeddings").is_dir():
        raise PipelineError(f"{run_dir}: not a run folder (no embeddings/); give results/<run>")
    settings = {**schema_defaults(), **(settings or {})}
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    tables = ("embeddings", "clusters", "metrics")
    available = run_layers(run_dir, tables)
    if layers is None:
        layers = available
    missing = sorted(set(layers) - set(available))
    if missing or not layers:
        raise PipelineError(f"{run_dir}: no finished embeddings, clusters and metrics for layer(s) "
                            f"{missing or 'any'} (finished: {available})")
    run = run_name(run_dir)
    reports = []
    needs_corpus = {"delphi", "neuronpedia"} & set(formats)
    shards = corpus_shards_of(run_dir, corpus_dir) if needs_corpus else []
    for fmt in formats:
        if fmt == "duckdb":
            from .sql import write_views

            start = time.perf_counter()
            report = write_views(out / "duckdb" / "views.sql", layers, run_dir)
            reports.append({"format": fmt, **report, "seconds": time.perf_counter() - start})
            continue
        if fmt == "delphi":
            from .common import pad_token_id
            from .delphi import export_delphi_layer

            pad = pad_token_id(run_dir / "model")
        for layer in layers:
            start = time.perf_counter()
            paths = {t: run_dir / t / f"layer-{layer}.parquet" for t in tables}
            if fmt == "delphi":
                report = export_delphi_layer(paths["embeddings"], paths["clusters"], shards,
                                             out / "delphi" / f"layer-{layer}", layer, run, pad,
                                             settings["delphi_splits"])
            else:
                from .neuronpedia import export_neuronpedia_layer

                report = export_neuronpedia_layer(paths["embeddings"], paths["clusters"], paths["metrics"], shards,
                                                  out / "neuronpedia" / f"layer-{layer}", layer, run, settings)
            reports.append({"format": fmt, **report, "seconds": time.perf_counter() - start})
    return reports
