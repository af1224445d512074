"""SAE latents as units: the embedding invariant, SAELens-layout loading, training, and the pieces the workflow uses."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuron_embeddings import schemas
from neuron_embeddings.embeddings import check_invariant, invariant_error
from neuron_embeddings.errors import PipelineError
from neuron_embeddings.sae import (
    SparseAutoencoder,
    TrainSettings,
    bootstrap_ci,
    check_fits,
    drop_inactive,
    held_out_windows,
    load_sae,
    save_sae,
    train_on_buffers,
)
from neuron_embeddings.storage import write_parquet
from neuron_embeddings.topk import NO_TOKEN
from neuron_embeddings.units import check_sae_config, sae_specs

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
    settings = TrainSettings(architecture=architecture, expansion=2, k=4, l1_coefficient=0.3,
                             lr=1e-2 if architecture == "topk" else 3e-3, batch_size=250, epochs=5, seed=0)
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
    settings = TrainSettings(architecture="topk", expansion=2, k=4, batch_size=100, epochs=2, seed=5)
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


def test_bootstrap_interval_is_seeded_and_holds_the_statistic():
    values = np.random.default_rng(0).exponential(size=500)
    median, low, high = bootstrap_ci(values, "median", 500, seed=3)
    assert low <= median <= high and median == pytest.approx(np.median(values))
    assert bootstrap_ci(values, "median", 500, seed=3) == (median, low, high)
    _, low_small, high_small = bootstrap_ci(values[:50], "median", 500, seed=3)
    assert high_small - low_small > high - low
    assert bootstrap_ci(np.array([]), "mean") == (None, None, None)


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
    config = {"layers": [1, 2], "sae": {
        "train": [{"layer": 1, "architecture": "topk", "expansion": 2, "k": 8}, {"layer": 2, "architecture": "relu"}],
        "external": [{"name": "theirs", "layer": 2, "path": str(tmp_path)}],
        "training": {"lr": 0.01},
    }}
    specs = sae_specs(config)
    assert list(specs) == ["layer-1-topk-x2", "layer-2-relu-x4", "theirs"]
    assert specs["layer-1-topk-x2"]["train"]["k"] == 8 and "l1_coefficient" not in specs["layer-1-topk-x2"]["train"]
    assert specs["layer-2-relu-x4"]["train"]["lr"] == 0.01 and "k" not in specs["layer-2-relu-x4"]["train"]
    with pytest.raises(PipelineError, match="has no cfg.json"):
        check_sae_config(config)
    write_saelens(tmp_path, {"d_in": D_IN, "d_sae": D_SAE}, saelens_tensors())
    check_sae_config(config)
    with pytest.raises(PipelineError, match="reads layer 3, which is not in layers"):
        check_sae_config({**config, "sae": {"train": [{"layer": 3}]}})
    with pytest.raises(PipelineError, match="a second SAE named 'theirs'"):
        sae_specs({**config, "sae": {"external": config["sae"]["external"] * 2}})
