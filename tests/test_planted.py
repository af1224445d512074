"""The whole workflow on a transformer whose neurons' features are planted by hand, beside its random-initialised
control: the planted features must come back as clusters, the dead neurons as dead (not as polysemantic), the
rare neuron as having too few examples, copies of a document must be dropped, and the comparison must be written.

The model: a one-layer GPT-2 whose attention and position embeddings are zero, so the MLP input at a token is the
layer-normed embedding of that token alone. Each word group g owns a block of embedding dimensions; a neuron's
input weights are ones on the blocks of the groups it reads. It then fires (GELU of a clearly positive number) on
exactly the words of its groups, and x * w of a word of one group points along that group's block: one cluster
per group. Every other neuron has zero weights and bias: GELU(0) = 0, never above zero, dead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import planned_jobs, run_snakemake

GROUPS = {
    "fruit": ["apple", "pear", "plum", "fig"],
    "colour": ["red", "blue", "green", "pink"],
    "number": ["one", "two", "three", "four"],
    "animal": ["cat", "dog", "cow", "pig"],
    "rare": ["zebra"],
}
FILLER = ["the", "and", "of", "to", "in", "is", "it", "on", "a", "at"]
PLANTED = {0: ["fruit", "colour"], 1: ["number"], 2: ["animal"], 3: ["fruit", "number", "animal"], 4: ["rare"]}
BLOCK, D_MODEL, N_NEURONS = 12, 96, 32


def make_planted_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [w for group in GROUPS.values() for w in group] + FILLER
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    config = GPT2Config(n_layer=1, n_embd=D_MODEL, n_head=2, n_inner=N_NEURONS, vocab_size=len(words),
                        n_positions=64, bos_token_id=1, eos_token_id=2, activation_function="gelu_new")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    block_of = {name: slice(i * BLOCK, (i + 1) * BLOCK) for i, name in enumerate(GROUPS)}
    filler_dims = slice(len(GROUPS) * BLOCK, D_MODEL)
    with torch.no_grad():
        for p in model.transformer.h[0].attn.parameters():
            p.zero_()
        model.transformer.wpe.weight.zero_()
        wte = torch.zeros(len(words), D_MODEL)
        gen = torch.Generator().manual_seed(1)
        for index, word in enumerate(words):
            group = next((g for g, members in GROUPS.items() if word in members), None)
            dims = block_of[group] if group else filler_dims
            wte[index, dims] = 1.0 + 0.1 * torch.randn(dims.stop - dims.start, generator=gen)
        model.transformer.wte.weight.copy_(wte)
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight.zero_()  # Conv1D: [d_model, neurons]
        mlp.c_fc.bias.zero_()
        for neuron, groups in PLANTED.items():
            for group in groups:
                mlp.c_fc.weight[block_of[group], neuron] = 1.0 / BLOCK
    model.save_pretrained(folder)
    return folder


def write_planted_corpus(folder: Path) -> Path:
    rng = random.Random(0)
    common = [w for name, group in GROUPS.items() if name != "rare" for w in group]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        words = [rng.choice(common) if rng.random() < 0.4 else rng.choice(FILLER) for _ in range(48)]
        if i in (5, 23):
            words[rng.randrange(48)] = "zebra"  # two examples in all: too few
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words))
    for copy in range(2):  # exact copies of doc00: dropped at the corpus stage
        (folder / f"copy{copy}.txt").write_text((folder / "doc00.txt").read_text())
    return folder


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    model = make_planted_model(root / "model")
    corpus = write_planted_corpus(root / "corpus")
    config = {
        "run": "planted",
        "models": [
            {"name": "planted", "source": str(model)},
            {"name": "control", "source": str(model), "random_init": {"seed": 0}},
        ],
        "corpus": {"sources": [{"path": str(corpus / "*.txt")}], "window_tokens": 16, "n_shards": 1},
        "layers": [0],
        "activations": {"batch_size": 8, "device": "cpu", "threads": 1},
        "selection": {"mode": "threshold", "alpha": 0.75, "cap": 40, "sign": "positive", "context_before": 4,
                      "context_after": 2},
        "clustering": {"method": "agglomerative", "threshold": 0.4},
        "metrics": {"min_examples": 5, "stability": {"resamples": 5, "fraction": 0.8}},
        "comparison": {"bootstrap": 200},
        "report": {"neurons_shown": 2, "examples_per_cluster": 2},
        "analyses": {"importance": {"neurons": 1, "examples_per_cluster": 1}, "similar": {"backend": "sklearn"}},
    }
    workdir = root / "work"
    dry = run_snakemake(workdir, config, "-n")
    proc = run_snakemake(workdir, config)
    return workdir / "results" / "planted", dry, proc, workdir, config


def test_planted_features_are_recovered_and_dead_neurons_are_dead(planted_run):
    run = planted_run[0]
    metrics = pq.read_table(run / "metrics/layer-0.parquet").to_pylist()
    assert [m["neuron"] for m in metrics] == list(range(N_NEURONS))  # every unit has a row
    by_neuron = {m["neuron"]: m for m in metrics}
    for neuron, groups in PLANTED.items():
        if "rare" in groups:
            continue
        assert by_neuron[neuron]["status"] == "live", by_neuron[neuron]
        assert by_neuron[neuron]["n_clusters"] == len(groups), (neuron, by_neuron[neuron])
        assert by_neuron[neuron]["stability"] == pytest.approx(1.0)
    assert by_neuron[4]["status"] == "few_examples" and by_neuron[4]["size"] == 2
    dead = [n for n in range(N_NEURONS) if n not in PLANTED]
    assert all(by_neuron[n]["status"] == "dead" and by_neuron[n]["n_clusters"] == 0 for n in dead)
    assert all(by_neuron[n]["size"] == 0 for n in dead)  # never above zero: no examples at all

    # each cluster of a planted neuron holds the words of exactly one of its groups
    emb = pq.read_table(run / "embeddings/layer-0.parquet", columns=["neuron", "token"]).to_pylist()
    clusters = pq.read_table(run / "clusters/layer-0.parquet", columns=["neuron", "cluster"]).to_pylist()
    group_of = {w: g for g, members in GROUPS.items() for w in members}
    for neuron in (0, 3):
        found: dict[int, set[str]] = {}
        for e, c in zip(emb, clusters):
            if e["neuron"] == neuron:
                found.setdefault(c["cluster"], set()).add(group_of[e["token"].strip()])
        assert sorted(sorted(g) for g in found.values()) == sorted([g] for g in PLANTED[neuron])

    summary = json.loads((run / "metrics/summary.json").read_text())["layers"]["0"]
    assert summary["live"] == 4 and summary["left_out"] == {"few_examples": 1, "dead": N_NEURONS - 5}
    assert summary["clusters_per_neuron_median"] == 1.5  # 2, 1, 1, 3: the dead ones no longer count
    assert summary["frac_polysemantic"] == 0.5


def test_duplicate_documents_are_dropped_and_the_corpus_is_shared(planted_run):
    run, dry = planted_run[:2]
    corpus = json.loads((run / "corpus/summary.json").read_text())
    assert corpus["duplicates_dropped"] == 2 and corpus["documents_read"] == 42 and corpus["documents"] == 40
    jobs = planned_jobs(dry)
    assert jobs["tokenize_corpus"] == 1 and jobs["prepare_model"] == 2  # the control reads the same shards
    assert jobs["neuron_metrics"] == 2 and jobs["compare_models"] == 1


def test_control_is_compared_side_by_side(planted_run):
    run = planted_run[0]
    control = json.loads((run / "models/control/model/neuron_embeddings.json").read_text())
    assert control["random_init_seed"] == 0
    planted = pq.read_table(run / "metrics/layer-0.parquet").column("status").to_pylist()
    fresh = pq.read_table(run / "models/control/metrics/layer-0.parquet").column("status").to_pylist()
    assert planted.count("dead") == N_NEURONS - 5 and fresh.count("dead") < N_NEURONS - 5  # fresh weights fire
    comparison = json.loads((run / "comparison/comparison.json").read_text())
    assert comparison["models"] == ["planted", "control"] and comparison["matched_by"] == "layer index"
    row = comparison["rows"][0]["models"]
    assert row["planted"]["clusters_median"]["value"] == 1.5
    low, high = row["planted"]["frac_polysemantic"]["low"], row["planted"]["frac_polysemantic"]["high"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert row["control"]["live"] == json.loads((run / "models/control/metrics/summary.json").read_text())["layers"]["0"]["live"]
    page = (run / "comparison/index.html").read_text()
    assert "random-initialised control (seed 0)" in page and "<img" in page
    report = (run / "report/index.html").read_text()
    assert "Models compared" in report and "Baselines" in report and "2 duplicate documents dropped" in report


def test_explorer_and_figures_cope_with_a_mostly_dead_layer(planted_run):
    run = planted_run[0]
    assert (run / "report/layer-0.png").stat().st_size > 1000
    text = (run / "explorer/data/layer-0/neurons.js").read_text()
    layer = json.loads(text[text.index(",") + 1 : text.rindex(")")])
    assert layer["status"][:5] == ["live", "live", "live", "live", "few_examples"]
    assert set(layer["status"][5:]) == {"dead"}
    assert np.isfinite([v for v in layer["ari_token"][:4]]).all()
    text = (run / "explorer/data/index.js").read_text()
    index = json.loads(text[text.index(",") + 1 : text.rindex(")")])
    summary = index["summary"]["0"]
    assert summary["live"] == 4 and summary["left_out"] == {"few_examples": 1, "dead": N_NEURONS - 5}
    assert [c["model"] for c in summary["compared"]] == ["control"]
    assert "random-initialised control" in summary["compared"][0]["description"]


def test_a_changed_control_reruns_its_own_chain_only(planted_run):
    workdir, config = planted_run[3:]
    changed = {**config, "models": [config["models"][0], {**config["models"][1], "random_init": {"seed": 1}}]}
    jobs = planned_jobs(run_snakemake(workdir, changed, "-n"))
    assert jobs == {"prepare_model": 1, "cache_activations": 1,
                    "select_examples": 1, "embed_neurons": 1, "cluster_features": 1, "neuron_metrics": 1,
                    "summarize_run": 1, "compare_models": 1, "report": 1, "explorer": 1, "all": 1}
