"""The HTML pages (run report, model comparison, toy report) render through autoescaping Jinja2 templates: corpus
and config text is shown, and shown escaped. Each test puts a markup payload where the page prints corpus or
config text and checks both that it is there once decoded (it was shown) and that only its escaped form is in
the HTML (it was escaped)."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa

from conftest import TEXTS
from neuron_embeddings import schemas
from neuron_embeddings.storage import write_parquet

PAYLOAD = '<script>window.pwned=1</script> "quotes" & </div>'  # the tiny test corpus's own (conftest.TEXTS)
ESCAPED = "&lt;script&gt;window.pwned=1&lt;/script&gt;"
CONFIG_PAYLOAD = '<img src=x onerror="window.pwned=2"> & </td>'  # where a page prints config text (names, paths)
CONFIG_ESCAPED = "&lt;img src=x onerror="
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # any bytes: the pages only inline them


class _Text(HTMLParser):
    """The page as a browser would show it: text and attribute values, entities decoded, tags dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.parts.extend(value for _, value in attrs if value)

    def handle_data(self, data):
        self.parts.append(data)


def shown(page: str) -> tuple[str, list[str]]:
    parser = _Text()
    parser.feed(page)
    parser.close()
    return "\n".join(parser.parts), parser.tags


def check_escaped(page: str, payload: str, escaped: str) -> None:
    """The payload was shown (it is in the page's decoded text) and escaped (only its escaped form is in the HTML)."""
    text, _ = shown(page)
    assert payload in text, "the payload must be shown (decoded, it is in the page's text)"
    assert escaped in page, "the payload must be in the HTML in its escaped form"
    assert payload not in page, "the raw payload must never be in the HTML"


def test_payload_is_the_test_corpus_text():
    assert any(PAYLOAD in text for text in TEXTS)


def _metrics(rows: list[dict]) -> pa.Table:
    base = {"layer": 0, "expert": None, "status": "live", "duplicates": 0, "largest_cluster_share": 0.5,
            "max_distance": 0.9, "mean_intra_distance": 0.2, "mean_inter_distance": 0.7, "ari_token": 0.1,
            "single_token_cluster_share": 0.5, "n_clusters_input": 1, "ari_input": 0.0, "stability": 1.0,
            "max_activation": 2.0, "min_activation": -1.0, "mean_activation": 0.1, "frac_positive": 0.6}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=schemas.METRICS)


def write_report_inputs(folder: Path) -> dict:
    """A one-layer run of two neurons (one example context carries PAYLOAD as a token; the model's source path and
    a compared model's and an SAE's names carry CONFIG_PAYLOAD), as write_report's arguments."""
    from neuron_embeddings.metrics import summarize_layer

    metrics = _metrics([{"neuron": 0, "size": 2, "n_clusters": 2, "mean_distance": 0.6},
                        {"neuron": 1, "size": 2, "n_clusters": 1, "mean_distance": 0.1}])
    write_parquet(metrics, folder / "metrics.parquet", {})
    contexts = [["Fortune", " favours", PAYLOAD, " stay"], ["a", "\n", "b\t", "c"]]
    emb, clusters = [], []
    for neuron in (0, 1):
        for rank, context in enumerate(contexts):
            emb.append({"layer": 0, "neuron": neuron, "expert": None, "example_rank": rank, "sample": "top_k",
                        "token_index": rank, "document": rank, "doc_position": 2, "token_id": 7, "token": context[2],
                        "activation": 1.5 - rank, "pre_activations": [1.5], "biases": [0.0], "embedding": [1.0, 0.5],
                        "context_tokens": context, "context_activations": [0.1, -0.4, 1.5 - rank, 0.0],
                        "context_center": 2})
            clusters.append({"layer": 0, "neuron": neuron, "expert": None, "example_rank": rank,
                             "cluster": rank if neuron == 0 else 0, "cluster_size": 1 if neuron == 0 else 2,
                             "is_central": neuron == 0 or rank == 0, "mean_similarity": 1.0})
    model = {"source": f"/models/{CONFIG_PAYLOAD}", "architecture": "LlamaForCausalLM", "n_layers": 1,
             "n_neurons": 2, "d_model": 1, "activation": "silu"}
    write_parquet(pa.Table.from_pylist(emb, schema=schemas.embeddings_schema(1, 2)), folder / "embeddings.parquet",
                  {"model": model, "cache_settings": {"window_tokens": 16, "sign": "both", "dtype": "float32"}})
    write_parquet(pa.Table.from_pylist(clusters, schema=schemas.CLUSTERS), folder / "clusters.parquet", {})
    documents = [{"document": i, "source": "s", "origin": f"doc{i}.txt", "n_tokens": 10} for i in range(2)]
    write_parquet(pa.Table.from_pylist(documents, schema=schemas.DOCUMENTS), folder / "documents.parquet", {})
    (folder / "summary.json").write_text(json.dumps({"layers": {"0": summarize_layer(metrics)}}))
    (folder / "corpus.json").write_text(json.dumps({"tokens": 20, "duplicates_dropped": 0}))
    estimate = {"value": 1.5, "low": 1.0, "high": 2.0}
    entry = {"layer": 0, "neurons": 2, "live": 2, "clusters_median": estimate, "frac_polysemantic": estimate,
             "ari_token_median": 0.1, "ari_input_median": None, "clusters_input_only_median": 1.0,
             "stability_median": 1.0}
    comparison = {"models": ["run", CONFIG_PAYLOAD], "descriptions": {"run": "this run", CONFIG_PAYLOAD: CONFIG_PAYLOAD},
                  "matched_by": "layer index", "bootstrap": {"resamples": 10, "seed": 0},
                  "rows": [{"position": "layer 0", "depth": 0.0, "models": {"run": entry, CONFIG_PAYLOAD: entry}}]}
    (folder / "comparison.json").write_text(json.dumps(comparison))
    ci = {"value": 1.0, "ci95": [0.5, 1.5]}
    units = {"units_compared": 2, "median_examples": 2.0, "clusters_per_unit_median": ci, "clusters_per_unit_mean": ci,
             "mean_distance_median": ci, "mean_distance_mean": ci, "polysemantic_mean": {"value": None, "ci95": [None, None]}}
    sae = {"sae": CONFIG_PAYLOAD, "layer": 0, "neurons": units, "latents": units,
           "quality": {"architecture": "topk", "k": 4, "d_sae": 8, "expansion": 4, "d_in": 2, "fve": 0.9, "l0": 4.0,
                       "dead_fraction": 0.0, "ce_clean": 1.0, "ce_spliced": 1.1, "ce_zero_ablation": 2.0,
                       "loss_recovered": 0.9, "eval_tokens": 100}}
    (folder / "sae.json").write_text(json.dumps(sae))
    (folder / "sae.png").write_bytes(PNG)
    return dict(
        run="tiny", summary_path=folder / "summary.json", metrics_paths={0: folder / "metrics.parquet"},
        clusters_paths={0: folder / "clusters.parquet"}, embeddings_paths={0: folder / "embeddings.parquet"},
        documents_path=folder / "documents.parquet",
        settings={"clustering": {"method": "threshold_graph", "threshold": 0.3}, "selection": {"mode": "top_k"},
                  "report": {"neurons_shown": 1, "examples_per_cluster": 2}},
        sae_comparisons=[(folder / "sae.json", folder / "sae.png")], corpus_summary_path=folder / "corpus.json",
        comparison_path=folder / "comparison.json",
    )


def test_report_shows_corpus_and_config_text_escaped(tmp_path):
    from neuron_embeddings.report import write_report

    write_report(tmp_path / "index.html", **write_report_inputs(tmp_path))
    page = (tmp_path / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    check_escaped(page, PAYLOAD, ESCAPED)  # a token of an example context
    check_escaped(page, CONFIG_PAYLOAD, CONFIG_ESCAPED)  # the model's source path, a compared model, an SAE
    assert "<script" not in page and "<img src=x" not in page and '"quotes"' not in page
    text, tags = shown(page)
    assert f"{PAYLOAD!r}: 1.500" in text  # the token's tooltip (its repr), an attribute: escaped, quotes included
    assert tags.count("img") == 2  # the layer's figure and the SAE's plot; the payloads' <img> is text
    assert page.count("data:image/png;base64,") == 2
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page  # base64 is not altered
    for heading in ("Layer 0", "Most polysemantic neurons of layer 0", "Least polysemantic neurons of layer 0",
                    "Models compared", "Baselines: what the clusters mean", "SAE latents vs neurons"):
        assert heading in text
    assert "b\u2192" in text and "\u21b5" in text  # tabs and newlines of tokens made visible
    assert "layer 0: 1.5 clusters [1.0, 2.0], 1.50 polysemantic [1.00, 2.00]; token ARI 0.10; 2 of 2 live" in text


def test_comparison_page_shows_model_names_and_descriptions_escaped():
    from neuron_embeddings.compare import comparison_page

    estimate = {"value": 0.25, "low": 0.2, "high": 0.3}
    entry = {"layer": 3, "neurons": 48, "live": 40, "clusters_median": estimate, "frac_polysemantic": estimate,
             "ari_token_median": 0.5, "ari_input_median": float("nan"), "clusters_input_only_median": None,
             "stability_median": 1.0}
    comparison = {"models": ["trained", CONFIG_PAYLOAD], "matched_by": "relative depth",
                  "descriptions": {"trained": f"/models/{PAYLOAD}", CONFIG_PAYLOAD: "control"},
                  "bootstrap": {"resamples": 10, "seed": 0},
                  "rows": [{"position": "depth 0.50", "depth": 0.5, "models": {"trained": entry, CONFIG_PAYLOAD: entry}},
                           {"position": "depth 1.00", "depth": 1.0, "models": {"trained": entry}}]}
    page = comparison_page(comparison, base64.b64encode(PNG).decode())
    check_escaped(page, PAYLOAD, ESCAPED)  # a description (the model's source path)
    check_escaped(page, CONFIG_PAYLOAD, CONFIG_ESCAPED)  # a model's name
    text, tags = shown(page)
    assert tags.count("img") == 1 and tags.count("tr") == 4  # header and three (position, model) rows
    assert "0.250 [0.200, 0.300]" in text and "0.2 [0.2, 0.3]" in text and "40 / 48" in text


def test_toy_report_shows_config_text_escaped(tmp_path):
    from neuron_embeddings.toy_report import write_toy_report

    candidate = {"method": CONFIG_PAYLOAD, "threshold": 0.3, "mean_ari": 0.9, "mean_abs_error": 0.1,
                 "polysemantic_agreement": 1.0, "neurons": 5}
    row = {"input_dim": 0, "sparsity": 0.9, "models": 1, "neurons": 5, "true_features_per_neuron": 2.0,
           "clusters_per_neuron": 2.0, "polysemantic_true": 1.0, "polysemantic_measured": 1.0, "mean_ari": 0.9,
           "mean_abs_error": 0.1, "mean_error": None}
    (tmp_path / "choice.json").write_text(json.dumps({"choice": candidate, "candidates": [candidate],
                                                      "by_sparsity": [row], "rule": "highest mean ARI"}))
    (tmp_path / "recovery.png").write_bytes(PNG)
    settings = {"model": {"n_features": 20, "note": PAYLOAD}, "probe": {"alpha": 0.3}, "input_dims": [0],
                "sparsities": [0.9], "seeds": [0]}
    write_toy_report(tmp_path / "choice.json", tmp_path / "recovery.png", tmp_path / "index.html", settings)
    page = (tmp_path / "index.html").read_text()
    text, tags = shown(page)
    assert json.dumps(settings["model"]) in text  # the config, shown as JSON
    assert ESCAPED in page and "<script" not in page and '\\"quotes\\"' not in page
    check_escaped(page, CONFIG_PAYLOAD, CONFIG_ESCAPED)  # a clustering method's name
    assert tags.count("img") == 1 and f"base64,{base64.b64encode(PNG).decode()}" in page
    assert "Recovery against sparsity" in text and "Every clustering tried" in text


def test_toy_training_does_not_run_the_pages():
    """Editing a page reruns its own stage, not toy-model training or the computing stages (codehash.py)."""
    from neuron_embeddings.codehash import imported_modules

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    assert "neuron_embeddings.pages" not in imported_modules(scripts / "train_toy.py")
    assert "neuron_embeddings.report" not in imported_modules(scripts / "train_toy.py")
    assert "neuron_embeddings.toy" not in imported_modules(scripts / "toy_report.py")
    assert "neuron_embeddings.report" not in imported_modules(scripts / "compare_models.py")
    for script in ("report.py", "compare_models.py", "toy_report.py"):
        assert "neuron_embeddings.pages" in imported_modules(scripts / script)
