"""How much memory a job will need, from the model's shape and the config alone (no torch: the Snakefile asks
while it is parsed, so every rule can declare `mem_mb` and a SLURM run asks for what the job needs).

The shape comes from the prepared model's manifest once it exists (exact: the parameters counted on the meta
device, the MLP as verified), else from a local config.json (the MLP taken as gated, an upper bound), else a
default. Every figure is an upper bound on the job's peak resident memory, plus a fixed allowance for Python,
torch and transformers themselves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import MANIFEST

RUNTIME_MB = 1500  # the interpreter with torch, transformers and pyarrow imported, measured ~1.1 GB
MARGIN = 1.25
DEFAULT_MB = 8000  # where nothing about the model can be read without loading it (a hub id before prepare_model)
STORE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_neurons: int
    n_projections: int
    parameters: int
    vocab: int

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.d_model

    @property
    def block_parameters(self) -> float:
        """Parameters of one block (attention, MLP, norms): the rest once the embeddings and the head are off."""
        return max(self.parameters - 2 * self.embedding_parameters, self.n_layers) / self.n_layers


def shape_from_config(cfg: dict[str, Any]) -> Shape | None:
    """A model's shape from its config.json, or None when the keys are not there. The MLP is taken as gated
    (three d_model x F matrices) and the head as untied: an upper bound."""
    cfg = cfg.get("text_config") or cfg
    pick = lambda *keys: next((int(cfg[k]) for k in keys if isinstance(cfg.get(k), int)), None)  # noqa: E731
    d = pick("hidden_size", "n_embd", "d_model")
    layers = pick("num_hidden_layers", "n_layer", "num_layers")
    vocab = pick("vocab_size")
    if not (d and layers and vocab):
        return None
    f = pick("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * d
    parameters = 2 * vocab * d + layers * (4 * d * d + 3 * d * f)
    return Shape(layers, d, f, 2, parameters, vocab)


def model_shape(model_dir: str | os.PathLike | None, source_folder: str | os.PathLike | None) -> Shape | None:
    """From the prepared model's manifest, else from a local model's config.json, else None."""
    manifest = Path(model_dir) / MANIFEST if model_dir else None
    if manifest is not None and manifest.is_file():
        info = json.loads(manifest.read_text())
        config = Path(model_dir) / "config.json"
        from_config = shape_from_config(json.loads(config.read_text())) if config.is_file() else None
        vocab = from_config.vocab if from_config else 0
        parameters = int(info.get("parameters") or (from_config.parameters if from_config else 0))
        return Shape(int(info["n_layers"]), int(info["d_model"]), int(info["n_neurons"]),
                     int(info["n_projections"]), parameters, vocab)
    if source_folder and (Path(source_folder) / "config.json").is_file():
        try:
            return shape_from_config(json.loads((Path(source_folder) / "config.json").read_text()))
        except (OSError, ValueError):
            return None
    return None


def _mb(nbytes: float) -> int:
    return int(RUNTIME_MB + MARGIN * nbytes / 2**20)


def caching_bytes(shape: Shape, deepest_layer: int, cached_layers: int, examples: int, batch_tokens: int,
                  shard_tokens: int | None, store_dtype: str = "float32") -> dict[str, float]:
    """Peak host memory of a caching job, by part. The checkpoint is float32 and only blocks up to the deepest
    cached layer are built; per cached layer the kept examples (values, keys, context, x rows) and one batch's
    captured tensors (x, pre-activations, activation, a float32 copy)."""
    kept_blocks = min(deepest_layer + 1, shape.n_layers)
    weights = 4 * (2 * shape.embedding_parameters + kept_blocks * shape.block_parameters)
    entries = shape.n_neurons * examples
    x_rows = min(entries, shard_tokens) if shard_tokens else entries
    per_layer = entries * (8 + 4 + 8 + 8 + 4 * shape.n_projections + 4 * 32) + 1.5 * x_rows * shape.d_model * STORE_BYTES[store_dtype]
    batch = batch_tokens * (shape.n_neurons * (3 + shape.n_projections) * 4 + shape.d_model * 4)
    return {"weights": weights, "examples": cached_layers * per_layer, "batch": cached_layers * batch}


def one_pass_candidates(cap: int, tokens: int) -> int:
    """Candidates a neuron holds in the one-pass threshold selection (topk.OnePassAccumulator) after `tokens`
    eligible entries: about cap x (1 + ln(tokens / cap)) when scores and priorities are unrelated; the bound
    assumes every token eligible."""
    return math.ceil(cap * (1 + math.log(max(tokens, cap) / cap)))


def caching_mb(shape: Shape | None, **kwargs: Any) -> int:
    if shape is None:
        return DEFAULT_MB
    return _mb(sum(caching_bytes(shape, **kwargs).values()))


def embedding_bytes(shape: Shape, examples: int) -> dict[str, float]:
    """Peak memory of an embedding job: one layer's input projections (read, then as float32), the selection's
    x rows, and the embeddings three times over (the array, its Arrow column, the written table)."""
    rows = shape.n_neurons * examples
    width = shape.n_projections * shape.d_model
    return {
        "weights": 2 * 4 * shape.n_neurons * width,
        "selection": 4 * rows * shape.d_model,
        "embeddings": 3 * 4 * rows * width,
    }


def embedding_mb(shape: Shape | None, examples: int) -> int:
    if shape is None:
        return DEFAULT_MB
    return _mb(sum(embedding_bytes(shape, examples).values()))


def remake_bytes(selection_bytes: int, weights_bytes: int, width: int) -> dict[str, float]:
    """Peak memory of a stage that streams a layer's embeddings remade from the selection (clustering, metrics,
    the sweep; tables.Remake): the selection read whole with its x stores widened to float32 (at most twice the
    file), the embedding weights, and a block of rows held four times over (x, the embeddings, their unit rows)."""
    from .tables import BLOCK_ROWS

    return {
        "selection": 2 * selection_bytes,
        "weights": weights_bytes,
        "blocks": 4 * 4 * BLOCK_ROWS * width,
    }


def remake_mb(selection: str | os.PathLike, weights: str | os.PathLike) -> int:
    """remake_bytes for these files (sizes from disk, the embedding width from the weights file's header);
    FileNotFoundError until they exist (Snakemake then evaluates it again)."""
    from safetensors import safe_open

    sizes = [os.path.getsize(selection), os.path.getsize(weights)]
    with safe_open(str(weights), framework="numpy") as handle:  # the header only: no tensor is read
        width = sum(int(handle.get_slice(name).get_shape()[-1]) for name in handle.keys() if name.startswith("weight."))
    return _mb(sum(remake_bytes(sizes[0], sizes[1], width).values()))


def whole_model_mb(shape: Shape | None, extra_bytes: float = 0.0) -> int:
    """A job that holds the whole float32 model (prepare_model, the SAE evaluation's LM loss)."""
    if shape is None:
        return DEFAULT_MB
    return _mb(4 * shape.parameters * 2 + extra_bytes)  # loaded, then saved or run: two copies at the peak


def gpu_mb(shape: Shape | None, deepest_layer: int, dtype: str, batch_tokens: int, cached_layers: int) -> int:
    """Device memory of a caching job: the kept blocks in the compute dtype and one batch's captured tensors."""
    if shape is None:
        return DEFAULT_MB
    item = STORE_BYTES[dtype]
    kept_blocks = min(deepest_layer + 1, shape.n_layers)
    weights = item * (2 * shape.embedding_parameters + kept_blocks * shape.block_parameters)
    batch = batch_tokens * (cached_layers * shape.n_neurons * (3 + shape.n_projections) * 4
                            + (16 * shape.d_model + 4 * shape.n_neurons) * item)
    return int(MARGIN * (weights + batch) / 2**20) + 500
