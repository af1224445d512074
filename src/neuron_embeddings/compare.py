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
from .figures import finite
from .metrics import live, summarize_layer
from .report import esc, fmt
from .storage import atomic_path, read_parquet, write_json


def interval(values: np.ndarray, statistic: Any, resamples: int, seed: int) -> dict[str, float | None]:
    """The statistic and its 95% percentile-bootstrap interval; the value itself as both ends when there is too
    little data (fewer than two values, or no spread) to resample."""
    from scipy.stats import bootstrap

    values = finite(values)
    if not values.size:
        return {"value": None, "low": None, "high": None}
    value = float(statistic(values))
    if values.size < 2 or resamples < 1 or np.all(values == values[0]):
        return {"value": value, "low": value, "high": value}
    result = bootstrap((values,), statistic, n_resamples=resamples, method="percentile", vectorized=False,
                       random_state=np.random.default_rng(seed), confidence_level=0.95)
    return {"value": value, "low": float(result.confidence_interval.low), "high": float(result.confidence_interval.high)}


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
    names = comparison["models"]
    body = [
        "<h1>Models compared</h1>",
        '<p class="muted">Layers matched by ' + esc(comparison["matched_by"]) + ". Figures over live neurons only; "
        "brackets: 95% bootstrap intervals (" + esc(comparison["bootstrap"]["resamples"]) + " resamples).</p>",
        "<ul>" + "".join(f"<li><b>{esc(n)}</b>: {esc(comparison['descriptions'].get(n, ''))}</li>" for n in names) + "</ul>",
        f'<img alt="comparison" src="data:image/png;base64,{png}">',
        "<table><tr><th>position</th><th class=\"l\">model</th><th>layer</th><th>live / neurons</th>"
        "<th>median clusters</th><th>polysemantic share</th><th>token ARI</th><th>clusters, x alone</th>"
        "<th>ARI x vs x*w</th><th>stability</th></tr>",
    ]
    for row in comparison["rows"]:
        for name in names:
            e = row["models"].get(name)
            if e is None:
                continue
            c, f = e["clusters_median"], e["frac_polysemantic"]
            body.append(
                f"<tr><td>{esc(row['position'])}</td><td class=\"l\">{esc(name)}</td><td>{esc(e['layer'])}</td>"
                f"<td>{esc(e['live'])} / {esc(e['neurons'])}</td>"
                f"<td>{fmt(c['value'], 1)} [{fmt(c['low'], 1)}, {fmt(c['high'], 1)}]</td>"
                f"<td>{fmt(f['value'], 3)} [{fmt(f['low'], 3)}, {fmt(f['high'], 3)}]</td>"
                f"<td>{fmt(e['ari_token_median'], 2)}</td><td>{fmt(e['clusters_input_only_median'], 1)}</td>"
                f"<td>{fmt(e['ari_input_median'], 2)}</td><td>{fmt(e['stability_median'], 2)}</td></tr>"
            )
    body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}"
             "th{background:#f3f3f3}td.l,th.l{text-align:left}.muted{color:#777}img{max-width:100%}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Models compared</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


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
