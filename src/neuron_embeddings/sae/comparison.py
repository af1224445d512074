"""The layer's MLP neurons against an SAE's latents: the polysemanticity measures of both sets of units side by
side (clusters per unit, mean pairwise cosine distance, share of units with more than one cluster), as medians and
means with percentile bootstrap 95% intervals (metrics.interval), with the SAE's quality figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import schemas
from ..metrics import interval
from ..storage import parquet_provenance, read_parquet, write_json

LEVEL = 0.95  # metrics.interval's


def unit_summary(metrics_path: str | os.PathLike, n_boot: int, seed: int) -> dict[str, Any]:
    """Clusters per unit and mean pairwise distance of one set of units (a metrics/*.parquet), as medians and
    means with bootstrap 95% intervals, over the live units (metrics.py: not dead, at least min_examples). Each
    figure is {"value": v, "ci95": [low, high]}."""
    table = read_parquet(metrics_path, schemas.METRICS)
    size = table.column("size").to_numpy()
    clusters = table.column("n_clusters").to_numpy()
    distance = np.array([np.nan if v is None else v for v in table.column("mean_distance").to_pylist()], dtype=np.float64)
    keep = np.array([status == "live" for status in table.column("status").to_pylist()], dtype=bool)
    out: dict[str, Any] = {"units": int(size.size), "units_with_examples": int((size > 0).sum()),
                           "units_compared": int(keep.sum()),
                           "median_examples": float(np.median(size[keep])) if keep.any() else None}
    statistics = {"median": np.median, "mean": np.mean}
    for key, values in (("clusters_per_unit", clusters[keep]), ("mean_distance", distance[keep]),
                        ("polysemantic", (clusters[keep] > 1).astype(np.float64))):
        for stat, fn in statistics.items():
            if key == "polysemantic" and stat == "median":
                continue
            ci = interval(values, fn, n_boot, seed)
            out[f"{key}_{stat}"] = {"value": ci["value"], "ci95": [ci["low"], ci["high"]]}
    return out


def compare_units(neuron_metrics: str | os.PathLike, latent_metrics: str | os.PathLike, quality_path: str | os.PathLike,
                  out_json: str | os.PathLike, name: str, layer: int, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """The layer's neurons against the SAE's latents, with the SAE's quality figures, as JSON (the plot of the two
    distributions is plots.plot_comparison)."""
    quality = json.loads(Path(quality_path).read_text())
    quality.pop("provenance", None)
    result = {
        "sae": name,
        "layer": layer,
        "quality": quality,
        "clustering": parquet_provenance(latent_metrics).get("clustering"),
        "neurons": unit_summary(neuron_metrics, n_boot, seed),
        "latents": unit_summary(latent_metrics, n_boot, seed),
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": LEVEL, "method": "percentile", "over": "live units"},
    }
    write_json(result, out_json)
    return {"neurons_clusters_median": result["neurons"]["clusters_per_unit_median"]["value"],
            "latents_clusters_median": result["latents"]["clusters_per_unit_median"]["value"]}
