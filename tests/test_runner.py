"""runner.run_stage: the torch settings every stage runs under, whether it imports torch up front or later."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = """
import sys
from neuron_embeddings.runner import run_stage

def stage():
    import torch  # lazily, as a numpy-first stage would
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(), "torch._inductor.config" in sys.modules)

print(run_stage("check", stage, None, threads=1))
"""


@pytest.mark.parametrize("early", [False, True], ids=["torch imported by the stage", "torch imported first"])
def test_stage_runs_deterministic_on_its_threads_without_loading_inductor(early, tmp_path):
    script = ("import torch\n" if early else "") + textwrap.dedent(CHECK)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    # deterministic, warn-only, the rule's 1 thread, and torch._inductor (2 s to import) never loaded
    assert out.strip().splitlines()[-1] == "(True, True, 1, False)"
