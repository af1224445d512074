"""SAE latents as units: the embedding invariant, SAELens-layout loading, training, and the pieces the workflow uses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from neuron_embeddings import schemas
from neuron_embeddings.codehash import imported_modules
from neuron_embeddings.embeddings import check_invariant, invariant_error
from neuron_embeddings.errors import PipelineError
from neuron_embeddings.sae.comparison import compare_units
from neuron_embeddings.sae.config import SCHEMA, check_sae_config, sae_specs, train_settings, with_defaults
from neuron_embeddings.sae.plots import plot_comparison
from neuron_embeddings.sae.latents import drop_inactive
from neuron_embeddings.sae.model import SparseAutoencoder, check_fits
from neuron_embeddings.sae.saelens_io import load_sae, save_sae
from neuron_embeddings.sae.streaming import held_out_windows
from neuron_embeddings.sae.training import TrainSettings, train_on_buffers
from neuron_embeddings.storage import write_parquet
from neuron_embeddings.topk import NO_TOKEN

D_IN, D_SAE = 12, 30


@pytest.fixture(autouse=True)
def one_thread():
    """These SAEs are tiny: on a busy machine more threads only contend (as in the workflow, which sets threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sae(architecture: str, seed: int = 0, apply_b_dec_to_input: bool = True) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(
        W_enc=torch.randn(D_IN, D_SAE, generator=gen), b_enc=torch.randn(D_SAE, generator=gen) * 0.5,
        W_dec=torch.randn(D_SAE, D_IN, generator=gen), b_dec=torch.randn(D_IN, generator=gen),
        architecture=architecture, k=5 if architecture == "topk" else None,
        threshold=torch.rand(D_SAE, generator=gen) if architecture == "jumprelu" else None,
        apply_b_dec_to_input=apply_b_dec_to_input, layer=3,
    )


@pytest.mark.parametrize("architecture", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_latent_embedding_sums_to_its_pre_activation(architecture, apply_b_dec):
    """e = (h - b_dec) * W_enc[:, f]; sum(e) + b_enc[f] is the latent's pre-activation, for every latent and token."""
    sae = random_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    h = torch.randn(64, D_IN) * 3
    x = sae.sae_input(h)
    assert torch.allclose(x, h - sae.b_dec if apply_b_dec else h)
    pre = sae.pre_activation(x)
    (W, b), = sae.unit_weights()  # one "projection": the layout of adapters' input_weights
    assert W.shape == (D_SAE, D_IN) and b.shape == (D_SAE,)
    tokens, latents = torch.meshgrid(torch.arange(64), torch.arange(D_SAE), indexing="ij")
    tokens, latents = tokens.reshape(-1), latents.reshape(-1)
    embedding = (x[tokens] * W[latents]).numpy()
    expected = pre[tokens, latents].numpy()[:, None].astype(np.float64)
    err = invariant_error(embedding, b[latents].numpy()[:, None].astype(np.float64), expected)
    assert err.max() < 1e-6
    check_invariant(embedding, b[latents].numpy()[:, None], expected, "float32", "test")  # the stage's own check
    f = sae.activation(pre)
    if architecture == "relu":
        assert torch.equal(f, torch.relu(pre))
    elif architecture == "topk":
        assert int((f > 0).sum(1).max()) <= 5
        kth = torch.topk(pre, 5, dim=1).values[:, -1:]
        assert torch.all((f > 0) <= (pre >= kth))  # active only among each token's 5 largest pre-activations
    else:
        assert torch.equal(f > 0, (pre > sae.threshold) & (pre > 0))


def write_saelens(folder, cfg: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    sae = random_sae("relu", seed)
    return {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}


def test_loads_a_saelens_6_topk_sae(tmp_path):
    """SAELens >= 6 writes architecture/k at the top level and the hook under `metadata`."""
    tensors = saelens_tensors()
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 4, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.3.mlp.hook_post", "hook_layer": 3}}
    sae = load_sae(write_saelens(tmp_path / "sae", cfg, tensors))
    assert sae.architecture == "topk" and sae.k == 4 and sae.layer == 3
    for name, tensor in tensors.items():
        assert torch.equal(getattr(sae, name), tensor)
    h = torch.randn(20, D_IN)
    pre = (h - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    top = torch.topk(pre, 4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))  # SAELens's TopK
    assert torch.allclose(sae.encode(h), expected)
    assert torch.allclose(sae.decode(expected), expected @ tensors["W_dec"] + tensors["b_dec"])
    check_fits(sae, 3, D_IN, "test")


def test_loads_a_legacy_saelens_relu_sae(tmp_path):
    """Older SAELens: hook_name/hook_layer at the top level, activation_fn_str, no architecture for ReLU SAEs."""
    tensors = saelens_tensors(2)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.mlp.hook_post", "hook_layer": 1,
           "activation_fn_str": "relu", "apply_b_dec_to_input": False, "normalize_activations": None}
    sae = load_sae(write_saelens(tmp_path / "sae", cfg, tensors))
    assert sae.architecture == "relu" and sae.layer == 1 and not sae.apply_b_dec_to_input
    h = torch.randn(7, D_IN)
    assert torch.allclose(sae.encode(h), torch.relu(h @ tensors["W_enc"] + tensors["b_enc"]))
    legacy_topk = {**cfg, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}
    sae = load_sae(write_saelens(tmp_path / "topk", legacy_topk, tensors))
    assert sae.architecture == "topk" and sae.k == 3


def test_loads_a_jumprelu_sae_with_its_thresholds(tmp_path):
    tensors = {**saelens_tensors(), "threshold": torch.full((D_SAE,), 0.5)}
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE}
    sae = load_sae(write_saelens(tmp_path / "sae", cfg, tensors))
    pre = sae.pre_activation(sae.sae_input(torch.randn(9, D_IN)))
    assert torch.equal(sae.activation(pre), pre * (pre > 0.5))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg, t: cfg.update(normalize_activations="expected_average_only_in"), "normalize_activations"),
        (lambda cfg, t: cfg.update(architecture="gated"), "architecture 'gated'"),
        (lambda cfg, t: t.pop("b_dec"), "b_dec"),
        (lambda cfg, t: t.update(b_enc=torch.zeros(D_SAE + 1)), "b_enc has shape"),
        (lambda cfg, t: cfg.update(d_sae=D_SAE * 2), "do not match the weights"),
        (lambda cfg, t: cfg.update(architecture="topk", k=None), "needs k"),
    ],
)
def test_refuses_what_it_cannot_read_with_one_line(tmp_path, change, message):
    cfg, tensors = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}, saelens_tensors()
    change(cfg, tensors)
    with pytest.raises(PipelineError, match=message):
        load_sae(write_saelens(tmp_path / "sae", cfg, tensors))
    with pytest.raises(PipelineError, match="cfg.json missing"):
        load_sae(tmp_path / "nowhere")


def test_an_sae_must_read_the_layers_mlp_activations(tmp_path):
    sae = random_sae("relu")
    with pytest.raises(PipelineError, match="layer 3's MLP has 13 neurons"):
        check_fits(sae, 3, D_IN + 1, "x")
    sae.meta["hook_name"] = "blocks.3.hook_resid_pre"
    with pytest.raises(PipelineError, match="hook_resid_pre"):
        check_fits(sae, 3, D_IN, "x")
    sae.meta["hook_name"] = "blocks.4.mlp.hook_post"
    sae.layer = 4
    with pytest.raises(PipelineError, match="trained on layer 4"):
        check_fits(sae, 3, D_IN, "x")


def test_saved_sae_is_a_saelens_folder_that_loads_back(tmp_path):
    sae = random_sae("topk")
    save_sae(sae, tmp_path / "out", {"stage": "test"}, model_name="tiny", context_size=16)
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["metadata"]["hook_name"] == "blocks.3.mlp.hook_post" == cfg["hook_name"]
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    with safe_open(str(tmp_path / "out" / "sae_weights.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
        assert json.loads(handle.metadata()["provenance"])["stage"] == "test"
    back = load_sae(tmp_path / "out")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert (back.architecture, back.k, back.layer) == ("topk", 5, 3)


def planted(n: int, seed: int, d_in: int = 16, n_features: int = 32, active: int = 2) -> torch.Tensor:
    """Activations made of `active` of `n_features` random directions per token, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(99)), dim=1)
    which = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(n)])
    amplitude = torch.rand(n, active, generator=gen) * 2 + 0.5
    return (amplitude[..., None] * directions[which]).sum(1) + 0.3


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_training_fits_planted_sparse_activations(architecture):
    data, held_out = planted(4000, 0), planted(1000, 1)
    settings = TrainSettings(**train_settings(architecture=architecture, expansion=2, k=4, l1_coefficient=0.3,
                                              lr=1e-2 if architecture == "topk" else 3e-3, batch_size=250, epochs=5,
                                              seed=0))
    sae, record = train_on_buffers(iter([data[:2000], data[2000:]]), 16, settings, torch.device("cpu"), 4000, layer=0)
    assert record["tokens"] == 4000 and record["steps"] == 5 * 16
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)  # unit-norm decoder rows
    with torch.no_grad():
        recon = sae.reconstruct(held_out)
        fve = 1 - (held_out - recon).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
        l0 = float((sae.encode(held_out) > 0).float().sum(1).mean())
    assert fve > 0.8, float(fve)
    assert l0 <= 4 if architecture == "topk" else l0 < sae.d_sae / 2, l0


def test_training_is_seeded():
    data = planted(600, 0)
    settings = TrainSettings(**train_settings(architecture="topk", expansion=2, k=4, batch_size=100, epochs=2, seed=5))
    first, _ = train_on_buffers(iter([data]), 16, settings, torch.device("cpu"), 600)
    again, _ = train_on_buffers(iter([data]), 16, settings, torch.device("cpu"), 600)
    assert torch.equal(again.W_enc, first.W_enc) and torch.equal(again.b_dec, first.b_dec)


def test_inactive_entries_are_emptied_so_latents_keep_only_tokens_where_they_fire():
    state = {
        "keys": torch.tensor([[3.0, 2.0, -torch.inf]], dtype=torch.float64),
        "values": torch.tensor([[1.5, 0.0, -torch.inf]]),
        "tokens": torch.tensor([[7, 8, NO_TOKEN]]),
        "pre": torch.tensor([[[1.5], [-0.2], [0.0]]]),
        "context": torch.tensor([[[0.1, 1.5], [0.0, 0.0], [torch.nan, torch.nan]]]),
        "xrow": torch.tensor([[0, 1, -1]]),
        "x": torch.zeros(2, 4),
    }
    out = drop_inactive(state)
    assert out["values"].tolist() == [[1.5, -torch.inf, -torch.inf]]
    assert out["keys"][0, 1] == -torch.inf and out["tokens"][0, 1] == NO_TOKEN and out["xrow"][0, 1] == -1
    assert torch.equal(out["context"][0, 0], state["context"][0, 0])


def metrics_table(path, clusters: list[int], distances: list[float | None], statuses: list[str]):
    n = len(clusters)
    columns = {field.name: pa.nulls(n, field.type) for field in schemas.METRICS}
    zeros = {"layer": [1] * n, "neuron": list(range(n)), "size": [0 if s == "dead" else 10 for s in statuses],
             "duplicates": [0] * n, "largest_cluster_share": [1.0] * n, "max_activation": [1.0] * n,
             "min_activation": [0.0] * n, "mean_activation": [0.5] * n, "frac_positive": [0.5] * n}
    columns.update({key: pa.array(values, schemas.METRICS.field(key).type) for key, values in zeros.items()})
    columns.update(status=pa.array(statuses, pa.string()), n_clusters=pa.array(clusters, pa.int32()),
                   mean_distance=pa.array(distances, pa.float32()))
    write_parquet(pa.table(columns, schema=schemas.METRICS), path, {"clustering": {"method": "test"}})
    return path


def test_comparison_has_seeded_bootstrap_intervals_over_live_units(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    statuses = ["live"] * (n - 20) + ["few_examples"] * 10 + ["dead"] * 10
    neurons = metrics_table(tmp_path / "neurons.parquet", list(rng.integers(1, 6, n)),
                            [float(v) for v in rng.uniform(0.3, 0.9, n)], statuses)
    latents = metrics_table(tmp_path / "latents.parquet", [1] * (n - 1) + [0], [0.2] * (n - 1) + [None],
                            ["live"] * (n - 1) + ["dead"])
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"fve": 0.9, "provenance": {}}))
    compare_units(neurons, latents, quality, tmp_path / "a.json", "x", 1, n_boot=200)
    compare_units(neurons, latents, quality, tmp_path / "b.json", "x", 1, n_boot=200)
    result = json.loads((tmp_path / "a.json").read_text())
    assert result == json.loads((tmp_path / "b.json").read_text())  # seeded
    assert result["quality"] == {"fve": 0.9} and result["bootstrap"]["resamples"] == 200
    summary = result["neurons"]
    assert summary["units"] == n and summary["units_compared"] == n - 20  # live units only
    for key in ("clusters_per_unit_median", "clusters_per_unit_mean", "mean_distance_median", "mean_distance_mean",
                "polysemantic_mean"):
        value, (low, high) = summary[key]["value"], summary[key]["ci95"]
        assert low <= value <= high and low < high, key
    assert summary["mean_distance_mean"]["value"] == pytest.approx(
        np.mean(pq.read_table(neurons).column("mean_distance").to_numpy()[: n - 20]), rel=1e-6)
    constant = result["latents"]["clusters_per_unit_median"]  # no spread: the value at both ends
    assert constant == {"value": 1.0, "ci95": [1.0, 1.0]}
    plot_comparison(neurons, latents, tmp_path / "plot.png", "x", 1)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_windows_do_not_depend_on_the_shard_split(tmp_path):
    def shard(path, windows):
        table = pa.table({"window": pa.array(windows, pa.int64()), "document": pa.array(windows, pa.int64()),
                          "doc_start": pa.array([0] * len(windows), pa.int32()),
                          "n_prefix": pa.array([1] * len(windows), pa.int8()),
                          "input_ids": pa.array([[1, 5, 6, 7, 8, 9]] * len(windows), pa.list_(pa.int32()))},
                         schema=schemas.WINDOWS)
        write_parquet(table, path, {})
        return path

    one = [shard(tmp_path / "all.parquet", list(range(20)))]
    two = [shard(tmp_path / "b.parquet", list(range(10, 20))), shard(tmp_path / "a.parquet", list(range(10)))]
    held = held_out_windows(one, eval_tokens=12, seed=0)
    assert len(held) == 3  # 5 real tokens each (BOS not counted): three windows reach 12
    assert held.tolist() == held_out_windows(two, 12, 0).tolist()
    assert held.tolist() != held_out_windows(one, 12, 1).tolist()
    with pytest.raises(PipelineError, match="nothing to train on"):
        held_out_windows(one, eval_tokens=1000, seed=0)


def test_sae_config_names_and_checks(tmp_path):
    config = with_defaults({"layers": [1, 2], "sae": {
        "train": [{"layer": 1, "architecture": "topk", "expansion": 2, "k": 8}, {"layer": 2, "architecture": "relu"}],
        "external": [{"name": "theirs", "layer": 2, "path": str(tmp_path)}],
        "training": {"lr": 0.01},
    }})
    specs = sae_specs(config)
    assert list(specs) == ["layer-1-topk-x2", "layer-2-relu-x4", "theirs"]
    # The setting the other architecture uses is None, so changing it reruns nothing.
    assert specs["layer-1-topk-x2"]["train"]["k"] == 8 and specs["layer-1-topk-x2"]["train"]["l1_coefficient"] is None
    assert specs["layer-2-relu-x4"]["train"]["lr"] == 0.01 and specs["layer-2-relu-x4"]["train"]["k"] is None
    for spec in (specs["layer-1-topk-x2"], specs["layer-2-relu-x4"]):
        TrainSettings(**spec["train"]).check()  # every field, from the schema's defaults where the config has none
    with pytest.raises(PipelineError, match="has no cfg.json"):
        check_sae_config(config)
    write_saelens(tmp_path, {"d_in": D_IN, "d_sae": D_SAE}, saelens_tensors())
    check_sae_config(config)
    with pytest.raises(PipelineError, match="reads layer 3, which is not in layers"):
        check_sae_config(with_defaults({**config, "sae": {"train": [{"layer": 3}]}}))
    with pytest.raises(PipelineError, match="a second SAE named 'theirs'"):
        sae_specs(with_defaults({**config, "sae": {"external": config["sae"]["external"] * 2}}))
    with pytest.raises(PipelineError, match="sae.training"):
        with_defaults({"sae": {"training": {"learning_rate": 0.1}}})


def test_sae_defaults_live_in_the_config_schema_only():
    """No dataclass default repeats the schema's: TrainSettings has none, and train_settings takes the schema's."""
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(TrainSettings))
    sae_schema = yaml.safe_load(SCHEMA.read_text())["properties"]["sae"]["properties"]
    settings = train_settings()
    assert set(settings) == {f.name for f in dataclasses.fields(TrainSettings)}
    assert settings["eval_tokens"] == sae_schema["eval_tokens"]["default"]
    for key, prop in sae_schema["training"]["properties"].items():
        assert settings[key] == prop["default"], key
    for key, prop in sae_schema["train"]["items"]["properties"].items():
        if "default" in prop and settings[key] is not None:
            assert settings[key] == prop["default"], key
    assert train_settings(architecture="relu", lr=0.5, eval_tokens=7)["lr"] == 0.5


def test_each_sae_script_imports_only_the_modules_it_runs():
    """Editing a module reruns exactly the stages whose scripts import it (codehash.py): the package's __init__
    imports nothing, the config read at parse time has no torch, and a plot does not retrain an SAE."""
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    sae_modules = {script: {m.rsplit(".", 1)[1] for m in imported_modules(scripts / f"{script}.py")
                            if m.startswith("neuron_embeddings.sae.")}
                   for script in ("train_sae", "import_sae", "cache_sae", "embed_sae_latents", "evaluate_sae",
                                  "compare_sae")}
    assert sae_modules == {
        "train_sae": {"training", "model", "saelens_io", "streaming"},
        "import_sae": {"saelens_io", "model"},
        "cache_sae": {"latents", "model", "saelens_io", "streaming"},
        "embed_sae_latents": {"embedding", "model", "saelens_io"},
        "evaluate_sae": {"evaluation", "model", "saelens_io", "streaming"},
        "compare_sae": {"comparison", "plots"},
    }
    code = ("import sys, neuron_embeddings.sae.config, neuron_embeddings.sae; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'neuron_embeddings.sae.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['neuron_embeddings.sae.config']"


def test_sae_on_a_mixture_of_experts_is_one_line(tmp_path):
    """sae.train on a MoE model (Mixtral, Qwen2-MoE) crashed in train_sae with a TypeError from the experts'
    accumulator; it is now refused in one line before the model loads (docs/model-families.md)."""
    import json

    from neuron_embeddings.errors import PipelineError
    from neuron_embeddings.sae.saelens_io import check_dense_model
    from neuron_embeddings.sources import MANIFEST

    manifest = {"architecture": "MixtralForCausalLM", "layout": {"experts": {"module": "mlp.experts", "n_experts": 4}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="layer 2 of MixtralForCausalLM is a mixture of experts"):
        check_dense_model(tmp_path, 2, "sae.train")
    (tmp_path / MANIFEST).write_text(json.dumps({"architecture": "LlamaForCausalLM", "layout": {"experts": None}}))
    check_dense_model(tmp_path, 2, "sae.train")
