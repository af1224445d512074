"""Which units a run studies besides the layers' MLP neurons: the latents of sparse autoencoders (config key `sae`).

Read while the Snakefile is parsed, so nothing here imports torch. Each SAE gets a name, its folder under
results/<run>/sae/<name>/ holds it in the SAELens layout and every stage's output for its latents:

- trained here (`sae.train`): `layer-{L}-{architecture}-x{expansion}` unless the entry gives a `name`;
- external (`sae.external`): the entry's `name`, its `path` a folder with cfg.json and sae_weights.safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import PipelineError

NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# Training settings shared by every SAE trained in a run (sae.training), with their defaults; per-SAE keys
# (architecture, expansion, k, l1_coefficient) sit in each sae.train entry.
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "batch_size": 1024,
    "epochs": 1,
    "buffer_tokens": 65536,
    "train_tokens": None,
    "warmup_fraction": 0.05,
    "aux_k_coefficient": 1 / 32,
    "dead_after_tokens": 20000,
    "seed": 0,
}
PER_SAE_DEFAULTS: dict[str, Any] = {"architecture": "topk", "expansion": 4, "k": 32, "l1_coefficient": 1.0}


def sae_specs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {"kind": "train" | "external", "layer": L, ...}: the SAEs of a config, in config order."""
    cfg = config.get("sae") or {}
    training = {**TRAINING_DEFAULTS, **(cfg.get("training") or {})}
    specs: dict[str, dict[str, Any]] = {}

    def add(name: str, spec: dict[str, Any], where: str) -> None:
        if not NAME.match(name):
            raise PipelineError(f"{where}.name: '{name}' may hold only letters, digits, '.', '_' and '-'")
        if name in specs:
            raise PipelineError(f"{where}: a second SAE named '{name}' (give each a distinct name)")
        specs[name] = spec

    for index, entry in enumerate(cfg.get("train") or []):
        merged = {**PER_SAE_DEFAULTS, **entry}
        name = entry.get("name") or f"layer-{entry['layer']}-{merged['architecture']}-x{merged['expansion']}"
        settings = {key: merged[key] for key in PER_SAE_DEFAULTS}
        if settings["architecture"] != "topk":
            settings.pop("k")
        if settings["architecture"] != "relu":
            settings.pop("l1_coefficient")
        add(name, {"kind": "train", "layer": int(entry["layer"]), "train": {**settings, **training}}, f"sae.train[{index}]")
    for index, entry in enumerate(cfg.get("external") or []):
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
