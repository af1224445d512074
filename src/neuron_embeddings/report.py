"""The run's HTML report: one self-contained page (plots inlined), rendered from report_assets/report.html.j2 with
autoescaping on (pages.py), so every piece of corpus text is escaped."""

from __future__ import annotations

import base64
import io
import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__, schemas
from .figures import hist
from .metrics import live, pick_neurons
from .pages import render
from .storage import atomic_path, parquet_provenance, read_parquet
from .tables import read_columns

MAX_CLUSTERS_SHOWN = 8


def show_token(token: str) -> str:
    """A token as shown: newlines and tabs made visible (plain text; the template escapes it)."""
    return token.replace("\n", "\u21b5\n").replace("\t", "\u2192")


def describe_selection(sel: dict[str, Any]) -> str:
    sign = sel.get("sign", "positive")
    what = {"positive": "activation", "negative": "-activation", "both": "|activation|"}.get(sign, "activation")
    if sel.get("mode", "top_k") == "top_k":
        return f"top_k: the {sel.get('top_k', 20)} strongest examples per neuron by {what} (ties broken by corpus position)"
    text = (f"threshold: every example with {what} >= {sel.get('alpha', 0.75)} x its max over the corpus, "
            f"at most {sel.get('cap', 200)} per neuron (a uniform sample, seed {sel.get('seed', 0)})")
    q = sel.get("quantiles") or {}
    if q.get("bins") and q.get("per_bin"):
        text += f"; plus {q['per_bin']} from each of {q['bins']} activation bins below that"
    return text


def layer_figure(metrics: pa.Table, layer: int) -> str:
    """Three histograms over the layer's live neurons (clusters per neuron, mean pairwise distance, agreement of
    the clusters with the max token) as a PNG in base64, for an inline data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = live(metrics)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3), dpi=100)
    hist(axes[0], kept.column("n_clusters").to_numpy(), integer=True, empty_note="no live neurons", color="#4c72b0")
    axes[0].set(title=f"layer {layer}: clusters per live neuron ({kept.num_rows} of {metrics.num_rows})",
                xlabel="clusters", ylabel="neurons")
    hist(axes[1], kept.column("mean_distance").to_pylist(), 30, empty_note="no live neurons", color="#dd8452")
    axes[1].set(title="mean pairwise cosine distance", xlabel="distance", ylabel="neurons")
    hist(axes[2], kept.column("ari_token").to_pylist(), np.linspace(-0.5, 1.0, 31), empty_note="no live neurons",
         color="#55a868")
    axes[2].set(title="clusters vs max token (1: token identity)", xlabel="adjusted Rand index", ylabel="neurons")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def example_view(tokens: list[str], acts: list[float], center: int, scale: float) -> dict[str, Any]:
    """One example as the template shows it: per token its text, tooltip, class and shading by the neuron's
    activation (orange above zero, blue below), and the activation at the max token with its sign."""
    shown = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        value = 0.0 if act is None or not math.isfinite(act) else act
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, abs(value) / scale))
        shown.append({
            "text": show_token(token),
            "title": f"{token!r}: {value:.3f}",
            "cls": "tok max" if i == center else "tok",
            "rgb": "255,120,0" if value >= 0 else "40,110,255",
            "alpha": f"{alpha:.2f}",
        })
    at_max = acts[center] if 0 <= center < len(acts) and acts[center] is not None else float("nan")
    return {"at_max": f"{at_max:+.2f}", "tokens": shown}


def neuron_view(neuron: int, metric: dict[str, Any], examples: list[dict[str, Any]], per_cluster: int) -> dict[str, Any]:
    """One neuron's section: its metrics and its clusters (at most MAX_CLUSTERS_SHOWN), each with its central
    example first and at most `per_cluster` examples."""
    scale = max((abs(e["activation"]) for e in examples), default=1.0)
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for e in examples:
        by_cluster.setdefault(e["cluster"], []).append(e)
    clusters = []
    for cluster in sorted(by_cluster)[:MAX_CLUSTERS_SHOWN]:
        members = sorted(by_cluster[cluster], key=lambda e: (not e["is_central"], e["example_rank"]))
        clusters.append({
            "cluster": cluster,
            "size": len(members),
            "examples": [example_view(e["context_tokens"], e["context_activations"], e["context_center"], scale)
                         for e in members[:per_cluster]],
        })
    return {"neuron": neuron, "metric": metric, "negative": sum(e["activation"] < 0 for e in examples),
            "clusters": clusters, "more_clusters": max(0, len(by_cluster) - MAX_CLUSTERS_SHOWN)}


def sae_views(comparisons: list[tuple[str | os.PathLike, str | os.PathLike]]) -> list[dict[str, Any]]:
    """Per SAE (its comparison JSON and plot, from sae.comparison.compare_units): the JSON and the plot in base64."""
    views = []
    for json_path, png_path in comparisons:
        with open(png_path, "rb") as handle:
            png = base64.b64encode(handle.read()).decode()
        views.append({"data": json.loads(open(json_path).read()), "png": png})
    return views


def write_report(
    out_path: str | os.PathLike,
    run: str,
    summary_path: str | os.PathLike,
    metrics_paths: dict[int, str | os.PathLike],
    clusters_paths: dict[int, str | os.PathLike],
    embeddings_paths: dict[int, str | os.PathLike],
    documents_path: str | os.PathLike,
    settings: dict[str, Any],
    sae_comparisons: list[tuple[str | os.PathLike, str | os.PathLike]] | None = None,
    corpus_summary_path: str | os.PathLike | None = None,
    comparison_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Gather what the report shows (report_assets/report.html.j2 lays it out) and write the page."""
    summary = json.loads(open(summary_path).read())
    corpus = json.loads(open(corpus_summary_path).read()) if corpus_summary_path else {}
    comparison = json.loads(open(comparison_path).read()) if comparison_path else None
    documents = read_parquet(documents_path, schemas.DOCUMENTS)
    report_cfg = settings.get("report", {})
    count = int(report_cfg.get("neurons_shown", 4))
    per_cluster = int(report_cfg.get("examples_per_cluster", 3))
    first_embeddings = parquet_provenance(next(iter(embeddings_paths.values())))
    cache = first_embeddings.get("cache_settings", {})
    sel = settings.get("selection", {})
    layers = []
    for layer in sorted(metrics_paths):
        metrics = read_parquet(metrics_paths[layer], schemas.METRICS)
        section: dict[str, Any] = {"layer": layer, "png": layer_figure(metrics, layer), "groups": []}
        layers.append(section)
        most, least = pick_neurons(metrics, count)
        shown = set(most) | set(least)
        if not shown:
            continue
        emb = read_columns(embeddings_paths[layer], schemas.EMBEDDINGS,  # not the embedding column: seconds to decode
                           [name for name in schemas.EMBEDDINGS.names if name != "embedding"])
        clusters = read_parquet(clusters_paths[layer], schemas.CLUSTERS)
        keep = np.isin(emb.column("neuron").to_numpy(), list(shown))
        rows = emb.filter(pa.array(keep)).to_pylist()
        cl_rows = clusters.filter(pa.array(keep)).to_pylist()
        examples: dict[int, list[dict[str, Any]]] = {}
        for e, c in zip(rows, cl_rows):
            examples.setdefault(e["neuron"], []).append({**e, "cluster": c["cluster"], "is_central": c["is_central"]})
        by_neuron = {m["neuron"]: m for m in metrics.to_pylist() if m["neuron"] in shown}
        for title, group in (("Most polysemantic", most), ("Least polysemantic", least)):
            section["groups"].append((title, [neuron_view(n, by_neuron[n], examples.get(n, []), per_cluster)
                                              for n in group]))
    page = render(
        __file__,
        "report.html.j2",
        run=run,
        version=__version__,
        model=first_embeddings.get("model", {}),
        cache=cache,
        corpus=corpus,
        documents=documents.num_rows,
        document_tokens=int(np.sum(documents.column("n_tokens").to_numpy())),
        selection=describe_selection({**sel, "sign": cache.get("sign", "positive")}),
        clustering_method=settings["clustering"]["method"],
        clustering_threshold=json.dumps(settings.get("clustering", {}).get("threshold")),
        summary_layers=sorted(summary["layers"].items(), key=lambda item: int(item[0])),
        comparison=comparison,
        layers=layers,
        sae_comparisons=sae_views(sae_comparisons or []),
    )
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"bytes": len(page.encode())}
