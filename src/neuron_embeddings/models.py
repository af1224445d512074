"""Loading causal language models and their tokenizers: a Hugging Face id, a local folder, or a GGUF file.

`prepare_model` turns any source into a plain local safetensors folder once (a cached intermediate), so that
every later stage loads in about a second, offline, and a cluster's compute nodes never need the hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_for
from .errors import PipelineError
from .sources import BUILTIN_MODELS, MANIFEST, ModelSource, check_gguf, resolve  # noqa: F401 (re-exported)
from .storage import usual_mode

log = logging.getLogger(__name__)


def load_source(spec: ModelSource) -> tuple[torch.nn.Module, Any]:
    """Load model and tokenizer from the configured source (hub, local folder, GGUF), fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if gguf:
        kwargs["gguf_file"] = gguf
        check_gguf(os.path.join(where, gguf))
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        if gguf:
            # A GGUF-loaded model carries a quantization_config and refuses save_pretrained; its weights are
            # already dequantized, so rebuild a plain model from the (quantization-free) config.
            config = AutoConfig.from_pretrained(where, **kwargs)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
            plain.load_state_dict(model.state_dict())
            model = plain
    except PipelineError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs the source and the reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"model.source: could not load '{spec.source}': {first}") from None
    model.float().eval()
    adapter_for(model)  # fail now, not after tokenizing, for an architecture with no adapter
    return model, tokenizer


@dataclass(frozen=True)
class ModelInfo:
    source: str
    revision: str | None
    architecture: str
    n_layers: int
    d_model: int
    n_neurons: int
    n_projections: int
    projections: list[str]
    activation: str


def describe(model: torch.nn.Module, spec: ModelSource) -> ModelInfo:
    adapter = adapter_for(model)
    return ModelInfo(
        source=spec.source,
        revision=spec.revision,
        architecture=type(model).__name__,
        n_layers=adapter.n_layers(model),
        d_model=adapter.d_model(model),
        n_neurons=adapter.n_neurons(model),
        n_projections=len(adapter.spec.in_projs),
        projections=list(adapter.spec.in_projs),
        activation=adapter.spec.activation,
    )


def prepare_model(spec: ModelSource, out_dir: str | os.PathLike) -> ModelInfo:
    """Save the model and tokenizer as a local safetensors folder, written whole or not at all."""
    model, tokenizer = load_source(spec)
    info = describe(model, spec)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, usual_mode(0o777))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(asdict(info), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk, a quota: one line naming the folder, nothing left half-written
        raise PipelineError(f"{out}: write failed, nothing written ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def load_prepared(
    model_dir: str | os.PathLike, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """Load a folder written by prepare_model (fp32, eval mode, on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = Path(model_dir) / MANIFEST
    if not manifest.is_file():
        raise PipelineError(f"{model_dir}: not a prepared model folder ({MANIFEST} missing)")
    info = ModelInfo(**json.loads(manifest.read_text()))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model.float().eval()
    return model, tokenizer, info


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"activations.device: '{requested}' requested but CUDA is not available")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
