"""The SAE stages of the real workflow on a tiny model: an SAE trained here and one imported in the SAELens layout,
their latents through the neurons' selection, embedding, clustering and metrics, quality figures and comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from conftest import planned_jobs, run_snakemake, tiny_config, write_corpus, plan_with_edit, scratch_copy
from neuron_embeddings import schemas
from neuron_embeddings.embeddings import verify_file
from neuron_embeddings.storage import check_schema, parquet_provenance

pytestmark = pytest.mark.slow

N_NEURONS = 48  # the tiny Llama's MLP width (conftest.make_tiny_model)


def external_sae(folder: Path, d_sae: int = 64) -> Path:
    """A random ReLU SAE on layer 1's MLP activations, saved as SAELens 6 would."""
    gen = torch.Generator().manual_seed(7)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": torch.randn(N_NEURONS, d_sae, generator=gen) * 0.3, "W_dec": torch.randn(d_sae, N_NEURONS, generator=gen),
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(N_NEURONS)}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": N_NEURONS, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "metadata": {"model_name": "tiny", "hook_name": "blocks.1.mlp.hook_post", "hook_layer": 1},
    }))
    return folder


@pytest.fixture(scope="module")
def sae_run(tiny_llama, tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("sae-workflow")
    corpus = write_corpus(workdir / "corpus")
    config = tiny_config(tiny_llama, corpus, run="tiny-sae", layers=[1])
    config["corpus"]["n_shards"] = 1
    config["selection"] = {"mode": "threshold", "alpha": 0.5, "cap": 8, "context_before": 5, "context_after": 3}
    config["sae"] = {
        "train": [{"layer": 1, "architecture": "topk", "expansion": 2, "k": 4}],
        "external": [{"name": "ext", "layer": 1, "path": str(external_sae(workdir / "external"))}],
        "training": {"batch_size": 64, "epochs": 2, "lr": 0.003},
        "eval_tokens": 200,
        "bootstrap": 100,
    }
    run = f"results/{config['run']}"
    targets = [f"{run}/report/index.html"] + [f"{run}/sae/{name}/comparison.json" for name in ("layer-1-topk-x2", "ext")]
    run_snakemake(workdir, config, *targets)
    return workdir, config


def test_latents_go_through_the_neurons_stages_and_keep_the_invariant(sae_run):
    workdir, config = sae_run
    root = workdir / "results" / config["run"] / "sae"
    for name, d_sae in (("layer-1-topk-x2", 2 * N_NEURONS), ("ext", 64)):
        emb_path = root / name / "embeddings.parquet"
        assert verify_file(emb_path) < 1e-4  # sum(embedding) + b_enc = the latent's pre-activation, from the file
        emb = pq.read_table(emb_path)
        check_schema(emb.schema, schemas.EMBEDDINGS, name)
        assert emb.schema.field("embedding").type.list_size == N_NEURONS  # x = h - b_dec lives in the MLP's space
        assert emb.num_rows > 0 and max(emb.column("neuron").to_pylist()) < d_sae
        assert min(emb.column("activation").to_pylist()) > 0  # a latent's examples are tokens where it fires
        assert np.bincount(emb.column("neuron").to_numpy()).max() <= config["selection"]["cap"]
        prov = parquet_provenance(emb_path)
        assert prov["units"]["kind"] == "sae_latents" and prov["units"]["sae"] == name
        assert prov["projections"] == ["W_enc"]
        check_schema(pq.read_schema(root / name / "clusters.parquet"), schemas.CLUSTERS, name)
        metrics = pq.read_table(root / name / "metrics.parquet")
        check_schema(metrics.schema, schemas.METRICS, name)
        assert metrics.num_rows == prov["units"]["d_sae"]  # every latent, with its status
        assert set(metrics.filter(pc.greater(metrics.column("size"), 0)).column("neuron").to_pylist()) == set(emb.column("neuron").to_pylist())


def test_quality_figures_and_comparison(sae_run):
    workdir, config = sae_run
    root = workdir / "results" / config["run"] / "sae"
    trained = json.loads((root / "layer-1-topk-x2" / "quality.json").read_text())
    assert trained["architecture"] == "topk" and trained["d_sae"] == 96 and trained["d_in"] == N_NEURONS
    assert 0 < trained["l0"] <= 4 and 0 <= trained["dead_fraction"] <= 1
    assert 0.3 < trained["fve"] <= 1  # even a short run on ~1,300 tokens explains much of the variance
    assert trained["eval_tokens"] >= 200 and trained["ce_tokens"] > 0
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation"):
        assert np.isfinite(trained[key]) and trained[key] > 0
    external = json.loads((root / "ext" / "quality.json").read_text())
    assert external["architecture"] == "relu" and external["d_sae"] == 64
    record = json.loads((root / "layer-1-topk-x2" / "training.json").read_text())
    assert record["tokens"] + trained["eval_tokens"] == trained["corpus_tokens"]  # held-out windows never trained on
    for name in ("layer-1-topk-x2", "ext"):
        comparison = json.loads((root / name / "comparison.json").read_text())
        for units in ("neurons", "latents"):
            summary = comparison[units]
            for key in ("clusters_per_unit_median", "clusters_per_unit_mean", "mean_distance_median"):
                value, (low, high) = summary[key]["value"], summary[key]["ci95"]
                assert low <= value <= high
        assert comparison["neurons"]["units"] == N_NEURONS
    page = (workdir / "results" / config["run"] / "report" / "index.html").read_text()
    assert "SAE latents vs neurons" in page and "layer-1-topk-x2" in page and "ext:" in page


def test_imported_sae_is_saved_in_the_same_layout(sae_run):
    workdir, config = sae_run
    cfg = json.loads((workdir / "results" / config["run"] / "sae" / "ext" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["hook_layer"] == 1 and cfg["d_sae"] == 64


def test_finished_sae_run_has_nothing_to_do(sae_run):
    workdir, config = sae_run
    run = f"results/{config['run']}"
    proc = run_snakemake(workdir, config, f"{run}/sae/ext/comparison.json", f"{run}/report/index.html", "-n")
    assert planned_jobs(proc) == {}, proc.stdout[-2000:]


def test_an_sae_module_edit_reruns_only_the_stages_that_run_it(sae_run, tmp_path):
    """The SAE package is split by stage, so e.g. a plot's colour reruns the comparison, not the training."""
    workdir, config = sae_run
    run = f"results/{config['run']}"
    targets = [f"{run}/report/index.html"] + [f"{run}/sae/{name}/comparison.json" for name in ("layer-1-topk-x2", "ext")]
    copy = scratch_copy(tmp_path / "repo")

    def plan(module: str) -> set[str]:
        return plan_with_edit(sae_run, copy, module, lambda text: text + "\n_RERUN_PROBE = 1\n", *targets)

    after_comparison = {"compare_sae", "report"}
    assert plan("neuron_embeddings.sae.plots") == after_comparison
    assert plan("neuron_embeddings.sae.comparison") == after_comparison
    after_embedding = {"embed_sae_latents", "cluster_sae_latents", "sae_latent_metrics"} | after_comparison
    assert plan("neuron_embeddings.sae.embedding") == after_embedding
    assert plan("neuron_embeddings.sae.training") >= {"train_sae"} | after_embedding
    assert "import_sae" not in plan("neuron_embeddings.sae.training")
