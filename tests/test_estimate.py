"""The dry-run estimate: per stage the jobs, tokens, disk and GPU-hours, checked against a finished run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from neuron_embeddings.estimate import render

pytestmark = pytest.mark.slow


def test_estimate_matches_the_finished_run(reference_run):
    workdir, config = reference_run
    run = workdir / "results" / config["run"]
    proc = subprocess.run(
        [sys.executable, "-m", "neuron_embeddings.cli", "estimate", "--json"], cwd=workdir, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    stages = {s["name"]: s for s in result["stages"]}
    # Jobs and tokens are exact: the same windows the corpus stage cut.
    shards = config["corpus"]["n_shards"]
    assert stages["cache_activations"]["jobs"] == shards and stages["cache_activations"]["where"] == "GPU"
    assert stages["embed_neurons"]["jobs"] == len(config["layers"])
    windows = sum(len(ids) for s in range(shards) for ids in pq.read_table(run / f"corpus/shard-{s:03d}.parquet")["input_ids"].to_pylist())
    assert result["tokens"] == windows
    # Disk: the caches and embeddings are bounded above, and not by much on this corpus.
    actual = sum(p.stat().st_size for p in (run / "activations").rglob("*.safetensors"))
    assert actual <= stages["cache_activations"]["disk_bytes"] * 1.05 and actual >= stages["cache_activations"]["disk_bytes"] / 3
    actual = sum(p.stat().st_size for p in (run / "embeddings").glob("*.parquet"))
    assert actual <= stages["embed_neurons"]["disk_bytes"] and actual >= stages["embed_neurons"]["disk_bytes"] / 3
    fit = result["calibration"]["cache"]
    assert fit["tokens_per_s"] > 0 and stages["cache_activations"]["hours"] > 0
    table = render(result)  # what the command prints without --json
    assert "stage" in table and "GPU-hours" in table and "cache_activations" in table and "calibrated on the CPU" in table


def test_estimate_refuses_a_bad_config_in_one_line(reference_run, tmp_path):
    workdir, config = reference_run
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**config, "layers": [0, 99]}))
    proc = subprocess.run([sys.executable, "-m", "neuron_embeddings.cli", "estimate", "--configfile", str(bad)],
                          cwd=workdir, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: layers: [99] out of range")


def test_timing_fit_never_gives_an_infinite_rate():
    """The larger calibration shard timed no slower than the smaller (noise, warm-up on a busy CPU): the slope was
    clamped to 1e-9 s/token, printed as 1,000,000,000 tokens/s and 0 GPU-hours."""
    from neuron_embeddings.estimate import fit_timings

    fit = fit_timings([(512, 0.30), (2048, 0.28)])
    assert fit["s_per_token"] == pytest.approx(0.28 / 2048)
    assert fit["tokens_per_s"] < 1e5
    regular = fit_timings([(512, 1.0), (2048, 2.5)])  # start-up 0.5 s, 1 ms per token
    assert regular["s_per_token"] == pytest.approx(1.5 / 1536) and regular["startup_s"] == pytest.approx(0.5)


def test_a_capped_document_count_is_a_lower_bound():
    """Counting stops at max_tokens, while the corpus stage samples windows from every document."""
    from neuron_embeddings.estimate import documents_text

    capped = {"config": {"corpus": {"max_tokens": 1000}}, "documents": 4, "tokens": 1000}
    assert documents_text(capped) == "at least 4 documents (counted until max_tokens was reached)"
    assert documents_text({**capped, "tokens": 900}) == "4 documents"
    assert documents_text({"config": {"corpus": {"max_tokens": None}}, "documents": 4, "tokens": 5000}) == "4 documents"
