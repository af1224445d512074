"""Checks of a configuration that are cheap enough to run before any job starts (after schema validation)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from .errors import PipelineError
from .models import MANIFEST, ModelSource, resolve


def model_layer_count(spec: ModelSource, prepared_model: str | os.PathLike | None) -> int | None:
    """The model's number of layers if it can be known without loading weights, else None."""
    if prepared_model and (Path(prepared_model) / MANIFEST).is_file():
        return int(json.loads((Path(prepared_model) / MANIFEST).read_text())["n_layers"])
    folder, gguf = resolve(spec)
    config_json = Path(folder) / "config.json"
    if not gguf and config_json.is_file():
        cfg = json.loads(config_json.read_text())
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                return int(cfg[key])
    return None


def check_config(config: dict[str, Any], prepared_model: str | os.PathLike | None = None) -> None:
    spec = ModelSource.from_config(config["model"])
    n_layers = model_layer_count(spec, prepared_model)
    if n_layers is not None:
        bad = [layer for layer in config["layers"] if layer >= n_layers]
        if bad:
            raise PipelineError(f"layers: {bad} out of range; the model has layers 0..{n_layers - 1}")
    for index, source in enumerate(config["corpus"]["sources"]):
        if "path" in source:
            pattern = os.path.expanduser(source["path"])
            matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
            if not any(os.path.isfile(m) for m in matches):
                raise PipelineError(f"corpus.sources[{index}].path: '{source['path']}' matches no file")
    corpus = config["corpus"]
    if corpus.get("min_window_tokens", 2) > corpus["window_tokens"]:
        raise PipelineError("corpus.min_window_tokens: larger than corpus.window_tokens")
    sel = config["selection"]
    needed = sel.get("context_before", 20) + sel.get("context_after", 10) + 1
    if needed > 4 * corpus["window_tokens"] + 1:
        raise PipelineError("selection.context_before/after: the context is far wider than corpus.window_tokens")
