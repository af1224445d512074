"""The workflow as Snakemake's linter and formatter see it: both workflows lint clean, every rule file is formatted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, SNAKEMAKE


@pytest.mark.parametrize("snakefile", ["Snakefile", "workflow/Snakefile.toy"])
def test_snakemake_lint_is_clean(snakefile):
    proc = subprocess.run([*SNAKEMAKE, "-s", snakefile, "--lint"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert proc.returncode == 0 and "in a good condition" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_snakefmt_check_is_clean():
    files = ["Snakefile", "workflow/Snakefile.toy", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow").rglob("*.smk"))]
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
