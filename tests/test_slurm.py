"""The real workflow on a real SLURM cluster (one node, Debian's slurmctld/slurmd/munge, started and stopped by
tests/setup/slurm_cluster.py), submitted through workflow/profiles/slurm exactly as a user would.

Only what this sandbox cluster lacks is passed on the command line: it has no slurmdbd (so status checks use
squeue, and the first one comes after 1 s instead of 40) and no accounts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEMAKE, output_differences, planned_jobs, tiny_config

sys.path.insert(0, str(REPO / "tests" / "setup"))
from slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

pytestmark = pytest.mark.slow

PROFILE = REPO / "workflow" / "profiles" / "slurm"
SANDBOX = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1", "--slurm-no-account"]
TIMEOUT = 540  # Snakemake may ignore SIGTERM while jobs run: `timeout -k` follows up with SIGKILL


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def gpu_rules() -> set[str]:
    """Rules that declare a `gpu` resource, read from the rule files."""
    found = set()
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), flags=re.M):
            resources = re.search(r"^\s+resources:\n((?:\s{8,}.*\n)*)", body, flags=re.M)
            if resources and re.search(r"^\s+gpu\s*=", resources.group(1), flags=re.M):
                found.add(name)
    return found


def test_every_gpu_rule_goes_to_the_gpu_partition_in_the_profile():
    settings = profile()
    cpu_partition = settings["default-resources"]["slurm_partition"]
    rules = gpu_rules()
    assert "cache_activations" in rules
    for rule in rules:
        partition = settings.get("set-resources", {}).get(rule, {}).get("slurm_partition")
        assert partition and partition != cpu_partition, f"{rule} asks for a GPU but the profile sends it to {partition}"


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp folders: munged runs as user munge, who cannot enter /tmp/pytest-of-root.
    root = Path(tempfile.mkdtemp(prefix="neuron-embeddings-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_on_slurm(cluster: SlurmCluster, workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        "timeout", "-k", "15", str(TIMEOUT), *SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--workflow-profile", str(PROFILE), *SANDBOX, *args,
    ]
    env = {**cluster.env, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=TIMEOUT + 60)


def jobs_of(cluster: SlurmCluster, workdir: Path) -> list[dict[str, str]]:
    return [job for job in cluster.jobs() if Path(job.get("WorkDir", "")).resolve() == workdir.resolve()]


def rule_of(job: dict[str, str]) -> str:
    match = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job.get("Comment", ""))
    assert match, f"SLURM job {job.get('JobId')} has no rule comment: {job.get('Comment')}"
    return match.group(1)


def test_workflow_runs_as_slurm_jobs_and_matches_the_local_run(cluster, reference_run, tmp_path):
    """The computing stages (corpus to metrics) and one analysis on the GPU partition (token importance) as SLURM
    jobs: every rule kind a cluster schedules differently; the report, explorer and CPU analyses run the same way."""
    ref_workdir, config = reference_run
    workdir = tmp_path / "slurm-run"
    targets = [f"results/{config['run']}/metrics/summary.json", f"results/{config['run']}/importance/layer-0.parquet"]
    start = time.monotonic()
    proc = run_on_slurm(cluster, workdir, config, *targets)
    wall = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output[-6000:]}\n{cluster.logs()}"
    print(f"\nSLURM run of the tiny workflow: {wall:.0f} s wall")

    # Every rule ran as SLURM jobs, one per planned job, except the local ones (prepare_model needs the hub).
    planned = planned_jobs(proc)
    local = set(re.findall(r"^localrule (\w+):", output, flags=re.M))
    assert local <= {"all", "prepare_model"}, local
    jobs = jobs_of(cluster, workdir)
    submitted: dict[str, int] = {}
    for job in jobs:
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        submitted[rule_of(job)] = submitted.get(rule_of(job), 0) + 1
    expected = {rule: count for rule, count in planned.items() if rule not in local}
    assert submitted == expected, (submitted, expected)
    assert "cache_activations" in submitted

    # GPU rules got the GPU partition and a GPU; CPU rules the CPU partition and none.
    settings = profile()
    cpu_partition = settings["default-resources"]["slurm_partition"]
    for job in jobs:
        rule = rule_of(job)
        wants_gpu = rule in gpu_rules() and config["activations"].get("gpus", 1) > 0
        if wants_gpu:
            assert job["Partition"] == settings["set-resources"][rule]["slurm_partition"], job
            assert "gpu:1" in job.get("TresPerJob", ""), job
        else:
            assert job["Partition"] == cpu_partition, job
            assert "gpu" not in job.get("TresPerJob", ""), job
    run = workdir / "results" / config["run"]
    for shard_log in sorted((run / "logs" / "cache_activations").rglob("*.log")):
        start_line = next(line for line in shard_log.read_text().splitlines() if ": start on " in line)
        assert "SLURM_JOB_ID=" in start_line and re.search(r"CUDA_VISIBLE_DEVICES=\d", start_line), start_line

    # The same outputs as the local run of the same config.
    ref = ref_workdir / "results" / config["run"]
    assert [d for d in output_differences(ref, run) if not d.startswith(f"only in {ref}")] == []
    assert (run / "importance" / "layer-0.parquet").is_file() and "token_importance" in submitted


@pytest.mark.extended  # a failing job's report is tested locally in test_bad_input.py
def test_failing_job_is_reported_with_its_log_and_the_run_stops_cleanly(cluster, tiny_llama, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("Plain text that tokenizes fine. " * 10)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n")  # tokenize_corpus fails on this, in its job
    config = tiny_config(tiny_llama, corpus, run="failing")
    workdir = tmp_path / "work"
    proc = run_on_slurm(cluster, workdir, config)
    output = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), output[-4000:]  # failed, and by itself (not killed by timeout)
    assert "Error in rule tokenize_corpus" in output
    log = "results/failing/logs/tokenize_corpus.log"
    assert log in output and ".snakemake/slurm_logs/rule_tokenize_corpus/" in output
    error_lines = [line for line in (workdir / log).read_text().splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and "bad.txt" in error_lines[0] and "not valid utf-8" in error_lines[0], error_lines
    # Stopped cleanly: nothing left queued or running, no output of the failed job, the lock released.
    jobs = jobs_of(cluster, workdir)
    assert [rule_of(job) for job in jobs] == ["tokenize_corpus"]
    assert all(job["JobState"] in ("FAILED", "COMPLETED") for job in jobs), jobs
    assert not (workdir / "results/failing/corpus/documents.parquet").exists()
    assert not list((workdir / ".snakemake" / "locks").glob("*"))
