"""Incremental reruns: Snakemake recomputes what a change touches and nothing else.

All against the session's one finished tiny run (conftest.reference_run): dry runs show the plan; a run that
executes works on a copy. Stages are named by rule; the assertions name what must and must not rerun, so new
analyses downstream do not break them.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from conftest import copy_run, planned_jobs, run_snakemake, scratch_copy

pytestmark = pytest.mark.slow

CORPUS = {"tokenize_corpus"}
CACHING = {"prepare_model", "activation_stats", "merge_stats", "cache_activations"}
UPSTREAM = CORPUS | CACHING | {"select_examples", "embed_neurons"}


def plan(workdir: Path, config: dict, *args: str) -> dict[str, int]:
    proc = run_snakemake(workdir, config, "-n", *args)
    return planned_jobs(proc)


def changed(config: dict, **edits) -> dict:
    out = copy.deepcopy(config)
    for path, value in edits.items():
        node = out
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return out


@pytest.fixture()
def edit_shared():
    """Change a file of the shared model or corpus for a dry run; its bytes and times are put back afterwards.
    (Touching is not enough: Snakemake reruns nothing when a newer input has the same checksum.)"""
    saved: dict[Path, tuple[bytes, int, int]] = {}

    def edit(path: Path, data: bytes) -> None:
        stat = path.stat()
        saved.setdefault(path, (path.read_bytes(), stat.st_atime_ns, stat.st_mtime_ns))
        path.write_bytes(data)

    yield edit
    for path, (data, atime, mtime) in saved.items():
        path.write_bytes(data)
        os.utime(path, ns=(atime, mtime))


def test_finished_run_has_nothing_to_do(reference_run):
    workdir, config = reference_run
    assert plan(workdir, config) == {}


def test_same_config_in_another_key_order_reruns_nothing(reference_run):
    """Params are compared by repr: a config whose keys are reordered (an editor, yaml.safe_dump's sorting) or
    whose defaults are written out reran everything from tokenize_corpus on."""
    workdir, config = reference_run

    def reversed_keys(value):
        if isinstance(value, dict):
            return {key: reversed_keys(value[key]) for key in reversed(list(value))}
        return [reversed_keys(v) for v in value] if isinstance(value, list) else value

    assert plan(workdir, reversed_keys(config)) == {}
    spelled_out = changed(config, corpus__min_window_tokens=2, corpus__seed=0)  # the schema's defaults
    assert plan(workdir, spelled_out) == {}


def test_threshold_change_reruns_only_clustering_and_what_follows(reference_run):
    workdir, config = reference_run
    jobs = plan(workdir, changed(config, clustering__threshold={"default": 0.5, "per_layer": {"2": 0.2}}))
    assert not set(jobs) & UPSTREAM, jobs
    assert "threshold_sweep" not in jobs  # the sweep reclusters the embeddings at its own thresholds
    assert jobs["cluster_features"] == 1  # only layer 0 uses the default threshold
    assert {"neuron_metrics", "summarize_run", "report"} <= set(jobs)


def test_selection_change_keeps_the_cached_shards(reference_run):
    workdir, config = reference_run
    jobs = plan(workdir, changed(config, selection__top_k=config["selection"]["top_k"] - 2))
    assert not set(jobs) & (CORPUS | CACHING), jobs
    assert jobs["select_examples"] == 2 and jobs["embed_neurons"] == 2 and jobs["cluster_features"] == 2


def test_corpus_change_reruns_everything_from_the_corpus(reference_run, edit_shared):
    workdir, config = reference_run
    corpus_dir = Path(config["corpus"]["sources"][0]["path"]).parent
    full = {"tokenize_corpus", "cache_activations", "select_examples", "embed_neurons", "cluster_features", "report"}
    # A different corpus in the config...
    jobs = plan(workdir, changed(config, corpus__max_tokens=config["corpus"]["max_tokens"] - 100))
    assert full <= set(jobs) and "prepare_model" not in jobs, jobs
    # ...a document edited in place...
    document = sorted(corpus_dir.glob("*.txt"))[0]
    edit_shared(document, document.read_bytes() + b" And one more sentence.")
    jobs = plan(workdir, config)
    assert full <= set(jobs) and "prepare_model" not in jobs, jobs
    # ...or one more document matching the glob.
    extra = corpus_dir / "zzz-added.txt"
    extra.write_text("one more document")
    try:
        jobs = plan(workdir, config)
    finally:
        extra.unlink()
    assert full <= set(jobs), jobs


def test_model_change_reruns_everything(reference_run, edit_shared, tmp_path):
    workdir, config = reference_run
    everything = {"prepare_model", "tokenize_corpus", "cache_activations", "embed_neurons", "cluster_features"}
    model = Path(config["model"]["source"])
    other = shutil.copytree(model, tmp_path / "other-model")
    jobs = plan(workdir, changed(config, model__source=str(other)))
    assert everything <= set(jobs), jobs
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # new weights in place, same path (a dry run never loads them)
    edit_shared(weights, bytes(data))
    jobs = plan(workdir, config)
    assert everything <= set(jobs), jobs


def test_adding_a_layer_computes_only_that_layer(reference_run, tmp_path):
    ref, config = reference_run
    workdir = copy_run(ref, tmp_path / "run")
    run = workdir / "results" / config["run"]
    more = changed(config, layers=sorted(config["layers"] + [1]))
    jobs = plan(workdir, more)
    assert jobs["cache_activations"] == config["corpus"]["n_shards"]  # one pass per shard, for layer 1 only
    for rule in ("select_examples", "embed_neurons", "cluster_features", "neuron_metrics"):
        assert jobs[rule] == 1, jobs
    assert "tokenize_corpus" not in jobs and "prepare_model" not in jobs
    # Run it (layer 1's chain up to its embeddings): nothing of layers 0 and 2 is rewritten.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "logs" not in p.parts}
    run_snakemake(workdir, more, f"results/{config['run']}/embeddings/layer-1.parquet")
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
    assert (run / "activations" / "layers-1" / "shard-000" / "layer-1.safetensors").is_file()
    assert not (run / "activations" / "layers-1" / "shard-000" / "layer-0.safetensors").exists()
    shutil.rmtree(workdir)


def test_an_edited_script_reruns_its_rule(reference_run, tmp_path):
    """The thin scripts are Snakemake's own business: it reruns a rule whose script changed, a comment included.
    (Package modules: tests/test_code_reruns.py.)"""
    workdir, config = reference_run
    repo = scratch_copy(tmp_path / "repo")
    snakefile = ("-s", str(repo / "Snakefile"))
    assert plan(workdir, config, *snakefile) == {}  # the copy is the same code: nothing to do
    script = repo / "workflow" / "scripts" / "cluster_features.py"
    script.write_text(script.read_text() + "\n# an edit\n")
    jobs = plan(workdir, config, *snakefile)
    assert jobs.get("cluster_features") == 2 and not set(jobs) & UPSTREAM, jobs
