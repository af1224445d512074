"""Which SAEs a run has (config key `sae`): their names, layers and training settings.

Read while the Snakefile is parsed, so nothing here imports torch. Each SAE gets a name, its folder under
results/<run>/sae/<name>/ holds it in the SAELens layout and every stage's output for its latents:

- trained here (`sae.train`): `layer-{L}-{architecture}-x{expansion}` unless the entry gives a `name`;
- external (`sae.external`): the entry's `name`, its `path` a folder with cfg.json and sae_weights.safetensors.

The functions take a validated config: every setting's default lives in the config schema
(workflow/schemas/config.schema.yaml), which Snakemake's validate fills in. Outside the workflow, `with_defaults`
fills them in from the same schema.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema.exceptions import best_match

from ..checks import filling_validator
from ..errors import PipelineError

NAME = re.compile(r"^[A-Za-z0-9._-]+$")
SCHEMA = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"
# Keys of a sae.train entry that name or place the SAE rather than set its training.
PLACEMENT_KEYS = ("layer", "name")
# Per-SAE settings that only one architecture uses: None for the other, so changing them reruns nothing there.
ARCHITECTURE_KEYS = {"k": "topk", "l1_coefficient": "relu"}


def sae_specs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {"kind": "train" | "external", "layer": L, ...}: the SAEs of a validated config, in config order.
    A trained SAE's "train" holds every setting its training reads (training.TrainSettings), in a fixed order."""
    cfg = config["sae"]
    shared = {**dict(sorted(cfg["training"].items())), "eval_tokens": cfg["eval_tokens"]}
    specs: dict[str, dict[str, Any]] = {}

    def add(name: str, spec: dict[str, Any], where: str) -> None:
        if not NAME.match(name):
            raise PipelineError(f"{where}.name: '{name}' may hold only letters, digits, '.', '_' and '-'")
        if name in specs:
            raise PipelineError(f"{where}: a second SAE named '{name}' (give each a distinct name)")
        specs[name] = spec

    for index, entry in enumerate(cfg["train"]):
        name = entry.get("name") or f"layer-{entry['layer']}-{entry['architecture']}-x{entry['expansion']}"
        settings = {key: value for key, value in sorted(entry.items()) if key not in PLACEMENT_KEYS}
        for key, architecture in ARCHITECTURE_KEYS.items():
            if settings["architecture"] != architecture:
                settings[key] = None
        add(name, {"kind": "train", "layer": int(entry["layer"]), "train": {**settings, **shared}}, f"sae.train[{index}]")
    for index, entry in enumerate(cfg["external"]):
        add(entry["name"], {"kind": "external", "layer": int(entry["layer"]), "path": str(entry["path"])},
            f"sae.external[{index}]")
    return specs


def check_sae_config(config: dict[str, Any]) -> None:
    """Before any job: every SAE's layer is one of the run's layers (its latents are compared with that layer's
    neurons), and every external SAE's folder holds the two SAELens files."""
    specs = sae_specs(config)
    layers = set(config["layers"])
    for name, spec in specs.items():
        if spec["layer"] not in layers:
            raise PipelineError(f"sae: SAE '{name}' reads layer {spec['layer']}, which is not in layers "
                                f"{sorted(layers)} (its latents are compared with that layer's neurons)")
        if spec["kind"] == "external":
            folder = Path(os.path.expanduser(spec["path"]))
            for file in ("cfg.json", "sae_weights.safetensors"):
                if not (folder / file).is_file():
                    raise PipelineError(f"sae.external: '{spec['path']}' of SAE '{name}' has no {file} "
                                        "(an SAE in the SAELens layout is a folder with cfg.json and sae_weights.safetensors)")


def with_defaults(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """A copy of `config` whose `sae` section is checked against the config schema and completed with its
    defaults: what the workflow's validated config holds, for callers outside Snakemake."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    section = {"type": "object", "properties": {"sae": schema["properties"]["sae"]}}
    filled = {"sae": copy.deepcopy(config["sae"])} if "sae" in config else {}
    error = best_match(filling_validator(section).iter_errors(filled))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "sae"
        raise PipelineError(f"{where}: {error.message}")
    return {**config, "sae": filled["sae"]}


def train_settings(schema_path: str | os.PathLike = SCHEMA, **settings: Any) -> dict[str, Any]:
    """The settings of one SAE trained here (training.TrainSettings's fields) as a config with these `settings`
    gives them: per-SAE keys (architecture, expansion, k, l1_coefficient), sae.training keys and eval_tokens, the
    rest the schema's defaults."""
    per_sae = schema_properties(schema_path)["train"]["items"]["properties"]
    entry = {"layer": 0, **{key: value for key, value in settings.items() if key in per_sae}}
    sae: dict[str, Any] = {"train": [entry], "training": {}}
    for key, value in settings.items():
        if key == "eval_tokens":
            sae["eval_tokens"] = value
        elif key not in per_sae:
            sae["training"][key] = value
    config = with_defaults({"sae": sae}, schema_path)
    (spec,) = sae_specs(config).values()
    return spec["train"]


def schema_properties(schema_path: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """The config schema's properties of the `sae` section."""
    return yaml.safe_load(Path(schema_path).read_text())["properties"]["sae"]["properties"]
