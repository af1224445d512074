"""The SAELens layout: a folder with cfg.json and sae_weights.safetensors (tensors only: safetensors, never pickle).

Trained SAEs are saved this way (SAELens's `SAE.load_from_disk` reads them), and external SAEs, from SAELens or
elsewhere, load the same way (`load_sae`); `import_sae` checks an external one against its layer and saves it in
the run's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import PipelineError
from ..sources import MANIFEST
from ..storage import atomic_path, save_tensors
from ..storage import provenance as stage_provenance  # save_sae's argument is named provenance
from .model import SparseAutoencoder, check_fits, hook_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# Our architecture names -> SAELens's ("standard" is SAELens's ReLU SAE).
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


def _cfg_value(cfg: dict[str, Any], key: str) -> Any:
    """A key at the top level (SAELens <= 5) or under metadata/meta (SAELens 6)."""
    if key in cfg:
        return cfg[key]
    for nested in ("metadata", "meta"):
        if isinstance(cfg.get(nested), dict) and key in cfg[nested]:
            return cfg[nested][key]
    return None


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE saved in the SAELens layout (ours or SAELens's own `save_model`), as float32 tensors.

    Supported: architecture standard (ReLU), topk (k from `k` or activation_fn_kwargs), jumprelu; inputs not
    normalised (normalize_activations none). Anything else stops with an error naming the key. The `.get`s below
    read a foreign file, whose keys differ between SAELens versions (absent keys take SAELens's own defaults).
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise PipelineError(f"{folder}: not an SAE in the SAELens layout ({path.name} missing)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{cfg_path}: not valid JSON ({exc})") from None
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise PipelineError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in weights]
    if missing:
        raise PipelineError(f"{weights_path}: tensors {', '.join(missing)} missing (SAELens names W_enc, b_enc, W_dec, b_dec)")
    saelens_arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    ours = {v: k for k, v in SAELENS_ARCHITECTURE.items()}.get(saelens_arch)
    if ours is None:
        raise PipelineError(f"{cfg_path}: architecture '{saelens_arch}' is not supported (standard, topk, jumprelu)")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none":
        raise PipelineError(
            f"{cfg_path}: normalize_activations '{normalize}' is not supported; fold the scaling into the weights "
            "first (SAELens: fold_activation_norm_scaling_factor) and save with normalize_activations none"
        )
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    layer = _cfg_value(cfg, "hook_layer")
    sae = SparseAutoencoder(
        W_enc=weights["W_enc"].float(), b_enc=weights["b_enc"].float(),
        W_dec=weights["W_dec"].float(), b_dec=weights["b_dec"].float(),
        architecture=ours, k=int(k) if k is not None else None,
        threshold=weights["threshold"].float() if "threshold" in weights else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        layer=int(layer) if layer is not None else None,
        meta={"hook_name": _cfg_value(cfg, "hook_name"), "model_name": _cfg_value(cfg, "model_name"),
              "neuron_embeddings": cfg.get("neuron_embeddings")},
    )
    if cfg.get("d_in") not in (None, sae.d_in) or cfg.get("d_sae") not in (None, sae.d_sae):
        raise PipelineError(f"{cfg_path}: d_in/d_sae ({cfg.get('d_in')}, {cfg.get('d_sae')}) do not match the weights "
                            f"({sae.d_in}, {sae.d_sae})")
    return sae.to(device)


def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike, provenance: dict[str, Any] | None = None,
             model_name: str | None = None, context_size: int | None = None) -> None:
    """Write cfg.json and sae_weights.safetensors (SAELens layout, readable by SAELens's load_from_disk), each file
    atomically. The weights file carries our provenance in its header metadata, like every other tensor file."""
    folder = Path(folder)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_tensors({k: v.detach().float().cpu().numpy() for k, v in tensors.items()}, folder / WEIGHTS_FILE,
                 provenance or {})
    metadata = {"model_name": model_name, "hook_name": hook_name(sae.layer) if sae.layer is not None else None,
                "hook_layer": sae.layer, "hook_head_index": None, "prepend_bos": True, "context_size": context_size}
    cfg = {
        "architecture": SAELENS_ARCHITECTURE[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": sae.k} if sae.architecture == "topk" else {}),
        # SAELens >= 6 reads these under metadata, older versions at the top level.
        "metadata": metadata,
        **{key: metadata[key] for key in ("model_name", "hook_name", "hook_layer")},
        "activation_fn_str": "topk" if sae.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.k} if sae.architecture == "topk" else {},
        "neuron_embeddings": provenance or {},
    }
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, default=str) + "\n")


def check_dense_model(model_dir: str | os.PathLike, layer: int, what: str) -> None:
    """An SAE reads one dense MLP's activations; a mixture-of-experts layer has one MLP per expert, which no SAE
    stage reads (docs/model-families.md). One line, before any model is loaded."""
    manifest = json.loads((Path(model_dir) / MANIFEST).read_text())
    if (manifest.get("layout") or {}).get("experts"):
        raise PipelineError(
            f"{what}: layer {layer} of {manifest.get('architecture', 'the model')} is a mixture of experts; "
            "SAEs on mixture-of-experts layers are not supported"
        )


def import_sae(folder: str | os.PathLike, out_dir: str | os.PathLike, layer: int, model_dir: str | os.PathLike) -> dict[str, Any]:
    """An external SAE (SAELens layout), checked against the layer it is configured for and saved in ours."""
    check_dense_model(model_dir, layer, f"sae.external '{folder}'")
    sae = load_sae(folder)
    n_neurons = int(json.loads((Path(model_dir) / MANIFEST).read_text())["n_neurons"])
    check_fits(sae, layer, n_neurons, f"sae.external '{folder}'")
    sae.layer = layer
    meta = stage_provenance("sae_import", {"path": str(folder)}, layer=layer, source_meta=sae.meta)
    save_sae(sae, out_dir, meta, model_name=sae.meta.get("model_name"))
    return {"d_in": sae.d_in, "d_sae": sae.d_sae, "architecture": sae.architecture}
