"""Several models of one run side by side: a trained model against its random-initialised control, checkpoints of
one training run, or different models on the same corpus.

Layers are matched by index when every model has as many layers as the reference; otherwise by relative depth
(layer / (layers - 1)), each of the reference's layers paired with the other model's nearest cached layer. Per
matched layer and model: the median clusters per live neuron and the share of live neurons with more than one
cluster, each with a 95% bootstrap interval (scipy.stats.bootstrap, percentile method, seeded), the baselines'
medians, and how many neurons were live.
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import numpy as np

from . import schemas
from .metrics import interval, live, summarize_layer
from .pages import render
from .storage import atomic_path, read_parquet, write_json


def _share_polysemantic(values: np.ndarray) -> float:
    return float(np.mean(values > 1))


def match_layers(models: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(how layers were matched, rows): per reference layer, each model's matched layer."""
    names = list(models)
    reference = models[names[0]]
    same_depth = all(m["n_layers"] == reference["n_layers"] for m in models.values())
    rows = []
    for layer in reference["layers"]:
        depth = layer / max(reference["n_layers"] - 1, 1)
        matched = {}
        for name, model in models.items():
            if same_depth:
                if layer in model["layers"]:
                    matched[name] = layer
            else:
                depths = [other / max(model["n_layers"] - 1, 1) for other in model["layers"]]
                matched[name] = model["layers"][int(np.argmin([abs(d - depth) for d in depths]))]
        position = f"layer {layer}" if same_depth else f"depth {depth:.2f}"
        rows.append({"position": position, "depth": round(depth, 4), "layers": matched})
    return ("layer index" if same_depth else "relative depth"), rows


def compare_models(
    models: dict[str, dict[str, Any]], out_json: str | os.PathLike, out_html: str | os.PathLike,
    resamples: int, seed: int,
) -> dict[str, Any]:
    """`models`: name -> {"n_layers", "layers", "metrics": {layer: path}, "description"}, the reference first."""
    matched_by, rows = match_layers(models)
    out_rows = []
    for row in rows:
        entries = {}
        for name, layer in row["layers"].items():
            table = read_parquet(models[name]["metrics"][layer], schemas.METRICS)
            kept = live(table)
            clusters = kept.column("n_clusters").to_numpy().astype(np.float64)
            summary = summarize_layer(table)
            entries[name] = {
                "layer": layer,
                "neurons": summary["neurons"],
                "live": summary["live"],
                "left_out": summary["left_out"],
                "clusters_median": interval(clusters, np.median, resamples, seed),
                "frac_polysemantic": interval(clusters, _share_polysemantic, resamples, seed),
                "clusters_mean": summary["clusters_per_neuron_mean"],
                "ari_token_median": summary["baselines"]["ari_token_median"],
                "ari_input_median": summary["baselines"]["ari_input_median"],
                "clusters_input_only_median": summary["baselines"]["clusters_input_only_median"],
                "stability_median": summary["baselines"]["stability_median"],
                "clusters": clusters.astype(int).tolist(),
            }
        out_rows.append({"position": row["position"], "depth": row["depth"], "models": entries})
    comparison = {
        "models": list(models),
        "descriptions": {name: m.get("description", "") for name, m in models.items()},
        "matched_by": matched_by,
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": 0.95, "method": "percentile"},
        "rows": [{**r, "models": {n: {k: v for k, v in e.items() if k != "clusters"} for n, e in r["models"].items()}}
                 for r in out_rows],
    }
    write_json(comparison, out_json)
    page = comparison_page(comparison, figure(out_rows, list(models)))
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"models": len(models), "rows": len(out_rows)}


def figure(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Per matched layer: each model's clusters per live neuron (box plots) and polysemantic share (with its
    interval), as an inline PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#dd8452", "#937860"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), dpi=100)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        positions = [r + (i - (len(names) - 1) / 2) * width for r in range(len(rows))]
        data = [row["models"].get(name, {}).get("clusters") or [np.nan] for row in rows]
        if any(np.isfinite(np.asarray(d, dtype=float)).any() for d in data):
            parts = axes[0].boxplot([d for d in data], positions=positions, widths=width * 0.9, patch_artist=True,
                                    showfliers=False, manage_ticks=False)
            for box in parts["boxes"]:
                box.set(facecolor=colours[i % len(colours)], alpha=0.5)
        shares = [row["models"].get(name, {}).get("frac_polysemantic") or {} for row in rows]
        value = np.array([s.get("value") if s.get("value") is not None else np.nan for s in shares], dtype=float)
        low = np.array([s.get("low") if s.get("low") is not None else np.nan for s in shares], dtype=float)
        high = np.array([s.get("high") if s.get("high") is not None else np.nan for s in shares], dtype=float)
        errors = np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0)
        axes[1].errorbar(positions, value, yerr=errors, fmt="o", color=colours[i % len(colours)], label=name, capsize=3)
    for ax in axes:
        ax.set_xticks(range(len(rows)), [r["position"] for r in rows])
    axes[0].set(title="clusters per live neuron", ylabel="clusters")
    axes[1].set(title="share of live neurons with >1 cluster (95% bootstrap)", ylabel="share", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def comparison_page(comparison: dict[str, Any], png: str) -> str:
    """The comparison page (compare_assets/comparison_page.html.j2): `comparison` as compare_models writes it,
    `png` the figure as base64."""
    return render(__file__, "comparison_page.html.j2", comparison=comparison, png=png)


def describe_model(manifest_path: str | os.PathLike) -> tuple[int, str]:
    """(layers, a one-line description) from a prepared model's manifest."""
    info = json.loads(open(manifest_path).read())
    text = f"{info.get('source')}"
    if info.get("revision"):
        text += f" @ {info['revision']}"
    if info.get("random_init_seed") is not None:
        text += f", random-initialised control (seed {info['random_init_seed']})"
    text += f"; {info.get('architecture')}, {info.get('n_layers')} layers x {info.get('n_neurons')} neurons"
    return int(info["n_layers"]), text
