"""The SAE: its tensors and forward pass (encode, decode), its latents' input weights, and the check that it reads
the MLP activations of the layer it is used on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PipelineError

ARCHITECTURES = ("relu", "topk", "jumprelu")


def hook_name(layer: int) -> str:
    """The hook point an SAE here reads (TransformerLens's name, as adapters.py uses it)."""
    return f"blocks.{layer}.mlp.hook_post"


@dataclass
class SparseAutoencoder:
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str  # relu | topk | jumprelu
    k: int | None = None  # topk: latents kept per token
    threshold: torch.Tensor | None = None  # jumprelu: per-latent threshold theta
    apply_b_dec_to_input: bool = True  # SAELens's own default
    layer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise PipelineError(f"sae: architecture '{self.architecture}' is not one of {', '.join(ARCHITECTURES)}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc.shape, (d_sae,)), "W_dec": (self.W_dec.shape, (d_sae, d_in)),
                  "b_dec": (self.b_dec.shape, (d_in,))}
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise PipelineError(f"sae: {name} has shape {tuple(got)}, expected {want} (W_enc is [d_in, d_sae])")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise PipelineError(f"sae: a topk SAE needs k in 1..{d_sae}, got {self.k}")
        if self.architecture == "jumprelu" and (self.threshold is None or tuple(self.threshold.shape) != (d_sae,)):
            raise PipelineError("sae: a jumprelu SAE needs a threshold tensor of shape [d_sae]")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: torch.device | str) -> "SparseAutoencoder":
        moved = {name: getattr(self, name).to(device) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        threshold = self.threshold.to(device) if self.threshold is not None else None
        return SparseAutoencoder(**moved, architecture=self.architecture, k=self.k, threshold=threshold,
                                 apply_b_dec_to_input=self.apply_b_dec_to_input, layer=self.layer, meta=self.meta)

    def sae_input(self, h: torch.Tensor) -> torch.Tensor:
        """x, what the encoder reads: h - b_dec (or h itself for an SAE saved with apply_b_dec_to_input false)."""
        h = h.to(self.W_enc.dtype)
        return h - self.b_dec if self.apply_b_dec_to_input else h

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "topk":
            top = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(self.sae_input(h)))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(h)).to(h.dtype)

    def unit_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The latents' input weights in the layout of adapters.ModelAdapter.input_weights: one 'projection',
        (W [d_sae, d_in], b [d_sae]), so that embedding = x * W[f] and sum + b[f] = pre-activation."""
        return [(self.W_enc.T.float().contiguous().cpu(), self.b_enc.float().cpu())]


def check_fits(sae: SparseAutoencoder, layer: int, n_neurons: int, where: str) -> None:
    """An SAE the pipeline uses as units of a layer must read that layer's MLP activations."""
    if sae.d_in != n_neurons:
        raise PipelineError(f"{where}: the SAE reads {sae.d_in} inputs, but layer {layer}'s MLP has {n_neurons} "
                            "neurons (SAEs here read the MLP activations, blocks.L.mlp.hook_post)")
    name = sae.meta.get("hook_name")
    if name and not str(name).endswith("mlp.hook_post"):
        raise PipelineError(f"{where}: the SAE was trained on '{name}'; SAEs here read the MLP activations "
                            f"({hook_name(layer)})")
    if name and sae.layer is not None and sae.layer != layer:
        raise PipelineError(f"{where}: the SAE was trained on layer {sae.layer}, the config gives layer {layer}")
