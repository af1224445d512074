"""Crash safety and determinism: kill -9 the workflow mid-run, rerun, get exactly the outputs of a clean run.

Every output is written under a temporary name and renamed when complete (storage.atomic_path), and Snakemake
marks the jobs it started as incomplete until they finish; a rerun (the profile sets rerun-incomplete) redoes
those and keeps the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, output_differences, run_snakemake
from neuron_embeddings import storage

sys.path.insert(0, str(REPO / "tests" / "setup"))
from slurm_cluster import unavailable_reason as slurm_unavailable  # noqa: E402

pytestmark = pytest.mark.slow


def core_target(config: dict) -> str:
    # The stages that compute (corpus -> activations -> selection -> embeddings -> clusters -> metrics).
    return f"results/{config['run']}/metrics/summary.json"


def start(workdir: Path, config: dict, *args: str) -> subprocess.Popen:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    log = open(workdir / "snakemake.out", "ab")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # A session of its own, so that kill -9 reaches Snakemake and every job it started, as a crash or an OOM
    # killer of the whole process group would.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def started(run: Path, stage: str) -> bool:
    return any(f"stage {stage}" in log.read_text(errors="replace") for log in (run / "logs" / stage).rglob("*.log"))


def kill_when(proc: subprocess.Popen, condition, timeout: float = 600) -> bool:
    """kill -9 the whole run as soon as condition() holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the run neither reached the kill point nor finished")


def finished_files_are_whole(run: Path) -> None:
    """Whatever carries a final name must read back completely (temporaries start with a dot)."""
    for path in run.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or "logs" in path.parts or "benchmarks" in path.parts:
            continue
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".safetensors":
            storage.load_tensors(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_kill_9_during_caching_and_embedding_then_rerun_equals_an_uninterrupted_run(reference_run, tmp_path):
    ref, config = reference_run
    workdir = tmp_path / "crash"
    workdir.mkdir()
    run = workdir / "results" / config["run"]
    target = core_target(config)
    kill_points = {
        "while caching": lambda: started(run, "cache_activations"),
        "with one shard cached": lambda: any((run / "activations").rglob("layer-*.safetensors")),
        "while embedding": lambda: started(run, "embed_neurons"),
    }
    killed = []
    for name, condition in kill_points.items():
        proc = start(workdir, config, target)
        if kill_when(proc, condition):
            killed.append(name)
        finished_files_are_whole(run)
        run_snakemake(workdir, config, "--unlock")  # the killed run's lock; then the same command again
    assert killed == list(kill_points), (killed, (workdir / "snakemake.out").read_text()[-3000:])
    run_snakemake(workdir, config, target)
    diffs = [d for d in output_differences(ref / "results" / config["run"], run) if not d.startswith(f"only in {ref}")]
    assert diffs == []
    assert (run / "metrics" / "summary.json").is_file()
    leftovers = [p for p in run.rglob(".*.tmp")]
    assert leftovers == [], leftovers


@pytest.mark.skipif(
    slurm_unavailable() is None,
    reason="test_slurm.py compares two clean runs of this config already (on SLURM and local), to the same standard",
)
def test_two_clean_runs_give_identical_outputs(reference_run, tmp_path):
    ref, config = reference_run
    run_snakemake(tmp_path, config, core_target(config))
    diffs = output_differences(ref / "results" / config["run"], tmp_path / "results" / config["run"])
    assert [d for d in diffs if not d.startswith(f"only in {ref}")] == []
    assert any(p.suffix == ".parquet" for p in (tmp_path / "results" / config["run"] / "embeddings").iterdir())


def test_a_killed_writer_never_leaves_a_finished_looking_file(tmp_path):
    """kill -9 in the middle of writing a Parquet file: the previous version stays, no file takes its name."""
    target = tmp_path / "table.parquet"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO / 'src')!r})
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from neuron_embeddings import storage
storage.write_parquet(pa.table({{"x": np.arange(10)}}), {str(target)!r}, {{"version": 1}})
real = pq.write_table
def dies_halfway(table, where, **kw):
    real(table, where, **kw)
    with open(where, "r+b") as f:
        f.truncate(os.path.getsize(where) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
pq.write_table = dies_halfway
storage.write_parquet(pa.table({{"x": np.arange(10**6)}}), {str(target)!r}, {{"version": 2}})
"""
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert storage.parquet_provenance(target) == {"version": 1}
    assert pq.read_table(target).num_rows == 10
    stale = list(tmp_path.glob(".table.parquet.*.tmp"))
    assert len(stale) == 1  # the dead writer's temporary: never read, and removed by the next write
    storage.write_parquet(pq.read_table(target), target, {"version": 3})
    assert list(tmp_path.glob(".table.parquet.*.tmp")) == []
