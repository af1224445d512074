"""The plot of the comparison: the distributions of clusters per unit and of mean pairwise cosine distance, for
the layer's live neurons and the SAE's live latents."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from .. import schemas
from ..figures import hist
from ..metrics import finite, live
from ..storage import atomic_path, read_parquet

COLOURS = {"neurons": "#4c72b0", "latents": "#dd8452"}


def plot_comparison(neuron_metrics: str | os.PathLike, latent_metrics: str | os.PathLike, out_png: str | os.PathLike,
                    name: str, layer: int) -> None:
    fig = Figure(figsize=(10, 3.2), dpi=100)  # no pyplot: no global backend, nothing to close
    axes = fig.subplots(1, 2)
    for label, path in (("neurons", neuron_metrics), ("latents", latent_metrics)):
        table = live(read_parquet(path, schemas.METRICS))
        clusters = table.column("n_clusters").to_numpy()
        distance = finite(table.column("mean_distance").to_pylist())
        text = f"{label} (n={table.num_rows})" if label == "neurons" else f"SAE latents (n={table.num_rows})"
        hist(axes[0], clusters, integer=True, density=True, histtype="step", linewidth=1.5, color=COLOURS[label],
             label=text)
        hist(axes[1], distance, np.linspace(0, max(1.0, float(distance.max(initial=0.0))), 41), density=True,
             histtype="step", linewidth=1.5, color=COLOURS[label], label=text)
    axes[0].set(title=f"layer {layer}: feature clusters per unit", xlabel="clusters", ylabel="share of units")
    axes[1].set(title=f"layer {layer}: mean pairwise cosine distance", xlabel="distance", ylabel="density")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"MLP neurons vs SAE '{name}' latents", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
