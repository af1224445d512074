"""The run's HTML report: one self-contained page (plots inlined), every piece of corpus text escaped."""

from __future__ import annotations

import base64
import html
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
from .storage import atomic_path, parquet_provenance, read_parquet

MAX_CLUSTERS_SHOWN = 8

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222;padding:0 1rem}
h1,h2,h3{font-weight:600} table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} .neuron{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.cluster{margin:.5rem 0 .75rem 1rem} .ex{font-family:ui-monospace,monospace;font-size:.85rem;margin:.15rem 0;
white-space:pre-wrap;word-break:break-all} .tok{border-radius:2px} .max{outline:2px solid #c00}
.muted{color:#777;font-size:.9rem} img{max-width:100%}
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def show_token(token: str) -> str:
    return esc(token.replace("\n", "\u21b5\n").replace("\t", "\u2192"))


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else esc(value)


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
    the clusters with the max token) as an inline PNG."""
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
    return f'<img alt="layer {layer} distributions" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def render_example(tokens: list[str], acts: list[float], center: int, scale: float) -> str:
    """One example: tokens shaded by the neuron's activation, orange above zero and blue below, the
    activation at the max token (with its sign) in front."""
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        value = 0.0 if act is None or not math.isfinite(act) else act
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, abs(value) / scale))
        rgb = "255,120,0" if value >= 0 else "40,110,255"
        cls = "tok max" if i == center else "tok"
        spans.append(
            f'<span class="{cls}" style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{esc(f"{token!r}: {value:.3f}")}">{show_token(token)}</span>'
        )
    at_max = acts[center] if 0 <= center < len(acts) and acts[center] is not None else float("nan")
    return f'<div class="ex"><span class="muted">{at_max:+.2f}</span> ' + "".join(spans) + "</div>"


def neuron_section(neuron: int, metric: dict[str, Any], examples: list[dict[str, Any]], per_cluster: int) -> str:
    scale = max((abs(e["activation"]) for e in examples), default=1.0)
    parts = [
        f'<div class="neuron" id="n{neuron}"><h3>neuron {neuron}'
        + (f' (expert {metric["expert"]})' if metric.get("expert") is not None else "") + "</h3>",
        f'<p class="muted">{metric["size"]} examples, {metric["n_clusters"]} clusters, '
        f'mean distance {fmt(metric["mean_distance"])}, max {fmt(metric["max_distance"])}, '
        f'intra {fmt(metric["mean_intra_distance"])}, inter {fmt(metric["mean_inter_distance"])}, '
        f'activation over the corpus from {fmt(metric.get("min_activation"))} to {fmt(metric["max_activation"])}; '
        f'{sum(e["activation"] < 0 for e in examples)} of the examples negative</p>',
        f'<p class="muted">clusters vs max token: ARI {fmt(metric.get("ari_token"), 2)}, '
        f'{fmt(metric.get("single_token_cluster_share"), 2)} of the clusters on one token; x alone (no weights): '
        f'{fmt(metric.get("n_clusters_input"))} clusters, ARI {fmt(metric.get("ari_input"), 2)} with these; '
        f'stability {fmt(metric.get("stability"), 2)}; {fmt(metric.get("duplicates"))} repeated contexts dropped</p>',
    ]
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for e in examples:
        by_cluster.setdefault(e["cluster"], []).append(e)
    for cluster in sorted(by_cluster)[:MAX_CLUSTERS_SHOWN]:
        members = sorted(by_cluster[cluster], key=lambda e: (not e["is_central"], e["example_rank"]))
        parts.append(f'<div class="cluster"><b>cluster {cluster}</b> <span class="muted">({len(members)} example{"s" if len(members) != 1 else ""}; '
                     f'the first shown is the central one)</span>')
        for e in members[:per_cluster]:
            parts.append(render_example(e["context_tokens"], e["context_activations"], e["context_center"], scale))
        parts.append("</div>")
    if len(by_cluster) > MAX_CLUSTERS_SHOWN:
        parts.append(f'<p class="muted">… and {len(by_cluster) - MAX_CLUSTERS_SHOWN} more clusters</p>')
    parts.append("</div>")
    return "\n".join(parts)


def summary_tables(summary: dict[str, Any], comparison: dict[str, Any] | None) -> list[str]:
    """The per-layer summary (live neurons only, with what was left out), the baselines, and, when the run
    compares models, each other model's figures beside this one's."""
    layers = sorted(summary["layers"].items(), key=lambda item: int(item[0]))
    out = [
        "<h2>Summary</h2>",
        '<p class="muted">Polysemanticity figures are over live neurons only: a dead neuron (it never fires on the '
        "selected sign, or its embeddings are zero) or one with fewer than the minimum number of examples is left "
        "out, and counted here.</p>",
        "<table><tr><th>layer</th><th>neurons</th><th>live</th><th>dead</th><th>few examples</th>"
        "<th>median examples</th><th>clusters per neuron (mean)</th><th>median</th>"
        "<th>polysemantic (&gt;1 cluster)</th><th>median mean distance</th><th>largest |activation| negative</th></tr>",
    ]
    for layer, row in layers:
        left = row.get("left_out", {})
        out.append(
            f"<tr><td>{esc(layer)}</td><td>{row['neurons']}</td><td>{fmt(row.get('live'))}</td>"
            f"<td>{fmt(left.get('dead'))}</td><td>{fmt(left.get('few_examples'))}</td>"
            f"<td>{fmt((row.get('examples_per_live_neuron') or {}).get('median'), 1)}</td>"
            f"<td>{fmt(row['clusters_per_neuron_mean'], 2)}</td><td>{fmt(row['clusters_per_neuron_median'], 1)}</td>"
            f"<td>{fmt(row['frac_polysemantic'], 3)}</td><td>{fmt(row['mean_distance_median'])}</td>"
            f"<td>{fmt(row.get('negative_dominant_share'), 3)}</td></tr>"
        )
    out.append("</table>")
    out += [
        "<h3>Baselines: what the clusters mean</h3>",
        '<p class="muted">Medians over live neurons. <b>Token ARI</b>: agreement of a neuron\'s clusters with the '
        "partition of its examples by max token (1: the clusters are just token identity). <b>One-token clusters</b>: "
        "share of its clusters whose examples all sit on one token. <b>x alone</b>: clusters of the MLP inputs without "
        "the neuron's weights, and their agreement (ARI) with the clusters of x * w: what the weights add. "
        "<b>Stability</b>: mean ARI with the clusters of random subsets of its examples.</p>",
        "<table><tr><th>layer</th><th>token ARI</th><th>one-token clusters</th><th>clusters, x alone</th>"
        "<th>ARI x vs x*w</th><th>stability</th></tr>",
    ]
    for layer, row in layers:
        b = row.get("baselines") or {}
        out.append(
            f"<tr><td>{esc(layer)}</td><td>{fmt(b.get('ari_token_median'), 2)}</td>"
            f"<td>{fmt(b.get('single_token_cluster_share_median'), 2)}</td>"
            f"<td>{fmt(b.get('clusters_input_only_median'), 1)}</td><td>{fmt(b.get('ari_input_median'), 2)}</td>"
            f"<td>{fmt(b.get('stability_median'), 2)}</td></tr>"
        )
    out.append("</table>")
    if comparison:
        out += comparison_table(comparison)
    return out


def comparison_table(comparison: dict[str, Any]) -> list[str]:
    """Every model of the run side by side, per matched layer: median clusters and polysemantic share of live
    neurons (95% bootstrap intervals), token ARI and live share."""
    models = comparison["models"]
    out = [
        "<h3>Models compared</h3>",
        f'<p class="muted">Layers matched by {esc(comparison["matched_by"])}. Medians and shares over live neurons, '
        "with 95% bootstrap intervals. The full comparison: <a href=\"../comparison/index.html\">comparison "
        "report</a>.</p>",
        "<table><tr><th>position</th>"
        + "".join(f'<th class="l">{esc(m)}</th>' for m in models)
        + "</tr>",
    ]
    for row in comparison["rows"]:
        cells = []
        for name in models:
            entry = row["models"].get(name)
            if entry is None:
                cells.append("<td>–</td>")
                continue
            cells.append(
                f'<td class="l">layer {esc(entry["layer"])}: {fmt(entry["clusters_median"]["value"], 1)} clusters '
                f'[{fmt(entry["clusters_median"]["low"], 1)}, {fmt(entry["clusters_median"]["high"], 1)}], '
                f'{fmt(entry["frac_polysemantic"]["value"], 2)} polysemantic '
                f'[{fmt(entry["frac_polysemantic"]["low"], 2)}, {fmt(entry["frac_polysemantic"]["high"], 2)}]; '
                f'token ARI {fmt(entry["ari_token_median"], 2)}; {esc(entry["live"])} of {esc(entry["neurons"])} live</td>'
            )
        out.append(f"<tr><td>{esc(row['position'])}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return out


def sae_comparison_section(comparisons: list[tuple[str | os.PathLike, str | os.PathLike]]) -> list[str]:
    """Per SAE (its comparison JSON and plot, from sae.compare_units): the SAE's quality figures, and clusters per
    unit and mean pairwise distance for the layer's neurons and the SAE's latents, with bootstrap 95% intervals."""
    if not comparisons:
        return []

    def ci(entry: dict[str, Any], digits: int = 2) -> str:
        low, high = entry["ci95"]
        if entry["value"] is None:
            return "–"
        return f"{entry['value']:.{digits}f} <span class=\"muted\">[{low:.{digits}f}, {high:.{digits}f}]</span>"

    body = [
        '<h2 id="sae">SAE latents vs neurons</h2>',
        '<p class="muted">Each sparse autoencoder reads its layer\'s MLP activations h; a latent\'s embedding is '
        "(h - b_dec) x its encoder column, and it goes through the neurons' own selection, clustering threshold and "
        "metrics. Units with at least two examples; medians and means with bootstrap 95% intervals. For reference, the "
        "paper author's MNIST tool found mean cosine distance per unit 0.46 for MLP neurons against 0.11 to 0.21 for "
        "SAE latents, and clusters per unit 47.7 against 11.7 to 18.7.</p>",
    ]
    for json_path, png_path in comparisons:
        data = json.loads(open(json_path).read())
        q = data["quality"]
        body.append(f"<h3>{esc(data['sae'])}: layer {esc(data['layer'])}, {esc(q['architecture'])}"
                    f"{', k ' + esc(q['k']) if q.get('k') else ''}, {esc(q['d_sae'])} latents "
                    f"({fmt(float(q['expansion']), 1)} x {esc(q['d_in'])} neurons)</h3>")
        body.append(
            "<table><tr><th>FVE</th><th>L0</th><th>dead latents</th><th>LM loss clean</th><th>spliced</th>"
            "<th>zero-ablated</th><th>loss recovered</th></tr>"
            f"<tr><td>{fmt(q['fve'])}</td><td>{fmt(q['l0'], 1)}</td><td>{fmt(q['dead_fraction'])}</td>"
            f"<td>{fmt(q['ce_clean'])}</td><td>{fmt(q['ce_spliced'])}</td><td>{fmt(q['ce_zero_ablation'])}</td>"
            f"<td>{fmt(q['loss_recovered'])}</td></tr></table>"
            f'<p class="muted">FVE, L0 and LM loss (nats per token) on {esc(q["eval_tokens"])} held-out tokens; dead = '
            "never active over the corpus; loss recovered = (zero-ablated - spliced) / (zero-ablated - clean).</p>"
        )
        body.append(
            '<table><tr><th class="l">units</th><th>compared</th><th>median examples</th><th>clusters per unit: median</th>'
            "<th>mean</th><th>mean distance: median</th><th>mean</th><th>polysemantic (&gt;1 cluster)</th></tr>"
        )
        for label, key in (("MLP neurons", "neurons"), ("SAE latents", "latents")):
            row = data[key]
            body.append(
                f'<tr><td class="l">{label}</td><td>{row["units_compared"]}</td><td>{fmt(row["median_examples"], 0)}</td>'
                f"<td>{ci(row['clusters_per_unit_median'], 1)}</td><td>{ci(row['clusters_per_unit_mean'])}</td>"
                f"<td>{ci(row['mean_distance_median'], 3)}</td><td>{ci(row['mean_distance_mean'], 3)}</td>"
                f"<td>{ci(row['polysemantic_mean'], 3)}</td></tr>"
            )
        body.append("</table>")
        with open(png_path, "rb") as handle:
            encoded = base64.b64encode(handle.read()).decode()
        body.append(f'<img alt="{esc(data["sae"])}: neurons vs latents" src="data:image/png;base64,{encoded}">')
    return body


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
    summary = json.loads(open(summary_path).read())
    corpus = json.loads(open(corpus_summary_path).read()) if corpus_summary_path else {}
    comparison = json.loads(open(comparison_path).read()) if comparison_path else None
    documents = read_parquet(documents_path, schemas.DOCUMENTS)
    report_cfg = settings.get("report", {})
    count = int(report_cfg.get("neurons_shown", 4))
    per_cluster = int(report_cfg.get("examples_per_cluster", 3))
    first_embeddings = parquet_provenance(next(iter(embeddings_paths.values())))
    model = first_embeddings.get("model", {})
    cache = first_embeddings.get("cache_settings", {})
    tokens = int(np.sum(documents.column("n_tokens").to_numpy()))
    sel = settings.get("selection", {})
    body = [
        f"<h1>Neuron embeddings: {esc(run)}</h1>",
        f'<p class="muted">neuron-embeddings {esc(__version__)}</p>',
        # The explorer is written by its own rule beside this report (results/<run>/explorer/).
        '<p><a href="../explorer/index.html">Open the explorer</a>: every neuron, its feature clusters, token '
        "importance and similar features of other neurons.</p>",
        "<h2>Run</h2><table>",
        f'<tr><th class="l">model</th><td class="l">{esc(model.get("source"))} ({esc(model.get("architecture"))}, '
        f'{esc(model.get("n_layers"))} layers, {esc(model.get("n_neurons"))} neurons per layer, '
        f'd_model {esc(model.get("d_model"))}, activation {esc(model.get("activation"))})</td></tr>',
        f'<tr><th class="l">corpus</th><td class="l">{documents.num_rows} documents, {tokens} document tokens; '
        f'windows of {esc(cache.get("window_tokens"))} tokens; {esc(corpus.get("tokens", "?"))} tokens seen by the model'
        + (f' (a seeded sample of {esc(corpus["tokens_available"])})' if corpus.get("sampled") else "")
        + f'; {esc(corpus.get("duplicates_dropped", "?"))} duplicate documents dropped</td></tr>',
        f'<tr><th class="l">selection</th><td class="l">{esc(describe_selection({**sel, "sign": cache.get("sign", "positive")}))}; compute dtype '
        f'{esc(cache.get("dtype"))}, stored x {esc(cache.get("store_dtype", "float32"))}</td></tr>',
        f'<tr><th class="l">clustering</th><td class="l">{esc(settings["clustering"]["method"])}, '
        f'cosine-similarity threshold {esc(json.dumps(settings.get("clustering", {}).get("threshold")))}</td></tr>',
        "</table>",
        *summary_tables(summary, comparison),
    ]
    for layer in sorted(metrics_paths):
        metrics = read_parquet(metrics_paths[layer], schemas.METRICS)
        body.append(f'<h2 id="layer-{layer}">Layer {layer}</h2>')
        body.append(layer_figure(metrics, layer))
        most, least = pick_neurons(metrics, count)
        shown = set(most) | set(least)
        if not shown:
            continue
        emb = read_parquet(embeddings_paths[layer], schemas.EMBEDDINGS).drop_columns(["embedding"])
        clusters = read_parquet(clusters_paths[layer], schemas.CLUSTERS)
        keep = np.isin(emb.column("neuron").to_numpy(), list(shown))
        rows = emb.filter(pa.array(keep)).to_pylist()
        cl_rows = clusters.filter(pa.array(keep)).to_pylist()
        examples: dict[int, list[dict[str, Any]]] = {}
        for e, c in zip(rows, cl_rows):
            examples.setdefault(e["neuron"], []).append({**e, "cluster": c["cluster"], "is_central": c["is_central"]})
        by_neuron = {m["neuron"]: m for m in metrics.to_pylist() if m["neuron"] in shown}
        for title, group in (("Most polysemantic", most), ("Least polysemantic", least)):
            body.append(f"<h3>{title} neurons of layer {layer}</h3>")
            for neuron in group:
                body.append(neuron_section(neuron, by_neuron[neuron], examples.get(neuron, []), per_cluster))
    body.extend(sae_comparison_section(sae_comparisons or []))
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Neuron embeddings: {esc(run)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"bytes": len(page.encode())}
