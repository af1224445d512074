"""Loading causal language models and their tokenizers: a Hugging Face id, a local folder, or a GGUF file.

`prepare_model` turns any source into a plain local safetensors folder once (a cached intermediate), so that
every later stage loads in about a second, offline, and a cluster's compute nodes never need the hub.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .adapters import (
    Candidates,
    UNSUPPORTED,
    MLPLayout,
    ModelAdapter,
    adapter_for,
    find_candidates,
    split_projections,
    verification_ids,
    verify,
)
from .errors import PipelineError
from .sources import BUILTIN_MODELS, MANIFEST, ModelSource, check_gguf, resolve  # noqa: F401 (re-exported)
from .storage import usual_mode
from .vocab import write_token_texts

log = logging.getLogger(__name__)


def _from_pretrained_kwargs(spec: ModelSource) -> tuple[str, dict[str, Any]]:
    where, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if gguf:
        kwargs["gguf_file"] = gguf
        check_gguf(os.path.join(where, gguf))
    return where, kwargs


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Inspection:
    """What a model's config alone says: its MLP layout (read on the meta device) and its size."""

    candidates: Candidates
    parameters: int
    architecture: str


def inspect_source(spec: ModelSource) -> Inspection:
    """Read the model's config (for a hub id: config.json only) and build it on the meta device, so the family,
    layers and size are known, and an MLP the method cannot read is refused, before any weight file is fetched."""
    from transformers import AutoModelForCausalLM

    try:
        config = source_config(spec)
    except PipelineError:  # the source itself is wrong (a missing folder, not a GGUF file): already one line
        raise
    except Exception as exc:  # transformers raises many types; the user needs the source and the reason
        raise PipelineError(f"model.source: could not read the config of '{spec.source}': {_one_line(exc)}") from None
    family = getattr(config, "model_type", "")
    if family in UNSUPPORTED:
        raise PipelineError(f"model.source: '{spec.source}' (model_type '{family}') is not supported: {UNSUPPORTED[family]}")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise PipelineError(
            f"model.source: '{spec.source}' (model_type '{getattr(config, 'model_type', '?')}') is not a causal "
            f"language model transformers can build: {_one_line(exc)}"
        ) from None
    candidates = find_candidates(model)
    parameters = sum(p.numel() for p in model.parameters())
    return Inspection(candidates, parameters, type(model).__name__)


def source_config(spec: ModelSource, quantized: bool = False) -> Any:
    """The source's config (a copy: callers may change theirs). A GGUF's is read once per process, since each read
    parses the whole file; without `quantized` its quantization_config is dropped (its weights are dequantized on
    load, and a model built from it is a plain one)."""
    where, kwargs = _from_pretrained_kwargs(spec)
    if "gguf_file" in kwargs:
        stat = os.stat(os.path.join(where, kwargs["gguf_file"]))
        config = copy.deepcopy(_read_gguf_config(where, tuple(sorted(kwargs.items())), stat.st_size, stat.st_mtime_ns))
    else:
        config = _read_config(where, kwargs)
    if not quantized and hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _read_config(where: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(where, **kwargs)


@functools.lru_cache(maxsize=4)
def _read_gguf_config(where: str, kwargs: tuple[tuple[str, Any], ...], size: int, mtime_ns: int) -> Any:
    """Cached on the file's size and time as well: a GGUF replaced in place is read anew."""
    return _read_config(where, dict(kwargs))


def load_source(spec: ModelSource) -> tuple[torch.nn.Module, Any]:
    """Load model and tokenizer from the configured source (hub, local folder, GGUF), fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = _from_pretrained_kwargs(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        if spec.random_init_seed is not None:  # a control needs the architecture only: no weights read or dequantized
            model = random_init(source_config(spec), spec.random_init_seed, spec.trust_remote_code)
        elif "gguf_file" in kwargs:
            # A GGUF-loaded model carries a quantization_config and refuses save_pretrained; its weights are
            # already dequantized, so they go into a plain model of the (quantization-free) config. The config is
            # passed in: each read of it parses the whole GGUF (its vocabulary too), ~10 s for the demo's model.
            loaded = AutoModelForCausalLM.from_pretrained(where, config=source_config(spec, quantized=True), **kwargs)
            model = AutoModelForCausalLM.from_config(source_config(spec), trust_remote_code=spec.trust_remote_code)
            model.load_state_dict(loaded.state_dict())
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except PipelineError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs the source and the reason
        raise PipelineError(f"model.source: could not load '{spec.source}': {_one_line(exc)}") from None
    model.float().eval()
    return model, tokenizer


def random_init(config: Any, seed: int, trust_remote_code: bool = False) -> torch.nn.Module:
    """A model of this config with fresh weights, as the model's own initialiser draws them, seeded: the control
    a trained model's polysemanticity is compared with (a model that learned nothing)."""
    from transformers import AutoModelForCausalLM

    devices = torch.random.fork_rng(devices=[])  # leave the caller's generator where it was
    with devices:
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, torch_dtype=torch.float32)
    return fresh


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
    family: str = ""
    parameters: int = 0
    layout: dict[str, Any] | None = None  # adapters.MLPLayout, verified on load
    verification: dict[str, Any] | None = None  # its worst errors on the verification batch
    random_init_seed: int | None = None  # a random-initialised control of `source` (fresh weights, this seed)
    weights_by_name: bool = False  # the safetensors hold each projection under its module path

    @property
    def mlp_layout(self) -> MLPLayout:
        if self.layout is None:
            raise PipelineError(f"prepared model of '{self.source}' has no MLP layout: prepare it again")
        return MLPLayout.from_json(self.layout)


def describe(model: torch.nn.Module, spec: ModelSource) -> ModelInfo:
    adapter = adapter_for(model)
    layout = adapter.layout
    act = type(adapter.activation_fn(model, 0)).__name__
    activation = f"{act}(gate) * up" if layout.gated else act
    return ModelInfo(
        source=spec.source,
        revision=spec.revision,
        architecture=type(model).__name__,
        n_layers=adapter.n_layers(model),
        d_model=adapter.d_model(model),
        n_neurons=adapter.n_neurons(model),
        n_projections=len(layout.projections),
        projections=layout.projection_names,
        activation=activation,
        family=layout.family,
        parameters=sum(p.numel() for p in model.parameters()),
        layout=layout.to_json(),
        random_init_seed=spec.random_init_seed,
    )


def checkpoint_tensor_names(folder: str | os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file (relative to the folder) of a saved checkpoint, from its headers only."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    names: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            names.update({key: path.name for key in handle.keys()})
    return names


def prepare_model(spec: ModelSource, out_dir: str | os.PathLike) -> ModelInfo:
    """Save the model and tokenizer as a local safetensors folder, written whole or not at all.

    Before any weight is fetched the config is read and the MLP found on the meta device; once loaded, one real
    batch verifies the layout (adapters.verify), and the verified layout goes into the manifest for every stage.
    """
    inspection = inspect_source(spec)
    cand = inspection.candidates
    log.info(
        "model %s: %s (model_type %s), %d layers, d_model %d, %d neurons per layer, %.1f M parameters (%.1f GB in "
        "float32); MLP found: %s -> %s", spec.source, inspection.architecture, cand.family, cand.n_layers,
        cand.d_model, cand.n_neurons, inspection.parameters / 1e6, inspection.parameters * 4 / 1e9,
        " / ".join(", ".join(p.module if p.half is None else f"{p.module}[half {p.half}]" for p in o)
                   for o in cand.orderings[:1]), cand.out_proj,
    )
    model, tokenizer = load_source(spec)
    candidates = find_candidates(model)
    verification = verify(model, candidates, verification_ids(model))
    adapter_for(model, verification.layout)
    log.info("MLP layout verified on %d tokens: %s over %s; worst relative error %.1e (pre-activations), %.1e "
             "(activation)", verification.tokens, verification.layout.describe_activation(),
             ", ".join(verification.layout.projection_names), verification.pre_error, verification.act_error)
    info = replace(describe(model, spec), verification=verification.to_json())
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, usual_mode(0o777))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_token_texts(tokenizer, tmp)
        saved = checkpoint_tensor_names(tmp)
        adapter = ModelAdapter(verification.layout)
        wanted = [weight for layer in range(info.n_layers) for weight, _ in adapter.tensor_names(layer).values()]
        by_name = bool(wanted) and all(weight in saved for weight in wanted)
        if wanted and not by_name:
            log.warning("the saved checkpoint names the MLP weights differently from the modules: stages that need "
                        "one layer's weights will load the model up to that layer instead")
        info = replace(info, weights_by_name=by_name)
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


def read_manifest(model_dir: str | os.PathLike) -> ModelInfo:
    manifest = Path(model_dir) / MANIFEST
    if not manifest.is_file():
        raise PipelineError(f"{model_dir}: not a prepared model folder ({MANIFEST} missing)")
    known = {f.name for f in fields(ModelInfo)}
    return ModelInfo(**{k: v for k, v in json.loads(manifest.read_text()).items() if k in known})


def truncated_config(config: Any, keep_layers: int) -> Any:
    """The config of the model's first `keep_layers` blocks: per-layer lists (layer_types, ...) cut to match."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = int(text_config.num_hidden_layers)
    if keep_layers >= total:
        return config
    for key, value in list(vars(text_config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and not key.startswith("_"):
            setattr(text_config, key, type(value)(value[:keep_layers]))
    text_config.num_hidden_layers = keep_layers
    return config


def load_prepared(
    model_dir: str | os.PathLike, trust_remote_code: bool = False, up_to_layer: int | None = None
) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """Load a folder written by prepare_model (fp32, eval mode, on the CPU), with its verified MLP layout.

    With up_to_layer, only the blocks up to and including that layer are built and read: a stage that stops
    after layer L never holds the weights of the blocks past it (the LM head is kept, unused).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = read_manifest(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if up_to_layer is not None and up_to_layer + 1 < info.n_layers:
        config = truncated_config(config, up_to_layer + 1)
        log.info("building blocks 0..%d of %d: the checkpoint's later blocks are skipped on purpose", up_to_layer,
                 info.n_layers)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would list every skipped tensor as "UNEXPECTED"
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, trust_remote_code=trust_remote_code)
    model.float().eval()
    adapter_for(model, info.mlp_layout)
    return model, tokenizer, info


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def layer_input_weights(
    model_dir: str | os.PathLike, layer: int, trust_remote_code: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer's input projections (W [F, d], b [F]) in float32, read by name from the prepared checkpoint:
    memory for one layer, not the model. Falls back to loading the model up to that layer."""
    from safetensors import safe_open

    info = read_manifest(model_dir)
    adapter = ModelAdapter(info.mlp_layout)
    if not info.weights_by_name:
        model, _, _ = load_prepared(model_dir, trust_remote_code, up_to_layer=layer)
        return adapter.input_weights(model, layer)
    where = checkpoint_tensor_names(model_dir)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for module, (weight_name, bias_name) in adapter.tensor_names(layer).items():
        with safe_open(str(Path(model_dir) / where[weight_name]), "pt") as handle:
            weight = handle.get_tensor(weight_name)
        bias = None
        if bias_name in where:
            with safe_open(str(Path(model_dir) / where[bias_name]), "pt") as handle:
                bias = handle.get_tensor(bias_name)
        tensors[module] = (weight, bias)
    return split_projections(info.mlp_layout, tensors)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"activations.device: '{requested}' requested but CUDA is not available")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
