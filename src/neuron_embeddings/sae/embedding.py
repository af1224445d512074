"""The neurons' embedding stage on an SAE's latents: the encoder is the latents' input weights, so a latent's
embedding at an example is x * W_enc[:, f] (x = h - b_dec) with bias b_enc[f]; the neurons' invariant (sum + bias =
the latent's pre-activation) is checked before the file is written."""

from __future__ import annotations

import os
from typing import Any

from ..embeddings import build_embeddings
from .saelens_io import load_sae


def embed_latents(selection_path: str | os.PathLike, sae_dir: str | os.PathLike, model_dir: str | os.PathLike,
                  corpus_shards: list[str | os.PathLike], out_path: str | os.PathLike, layer: int, name: str,
                  trust_remote_code: bool, weights_path: str | os.PathLike | None = None) -> dict[str, Any]:
    sae = load_sae(sae_dir)
    units = {"kind": "sae_latents", "sae": name, "architecture": sae.architecture, "d_sae": sae.d_sae,
             "projections": ["W_enc"]}
    return build_embeddings(selection_path, model_dir, corpus_shards, out_path, layer, trust_remote_code,
                            weights=sae.unit_weights(), units=units, weights_path=weights_path)
