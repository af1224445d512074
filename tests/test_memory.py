"""The memory each job declares (mem_mb, gpu_mem_mb): from the prepared model's shape, evaluated once it exists."""

from __future__ import annotations

import json
import re

from conftest import run_snakemake, tiny_config
from neuron_embeddings import memory

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "vocab_size": 128256, "num_attention_heads": 32}


def test_shape_from_config_is_an_upper_bound_of_the_real_size():
    shape = memory.shape_from_config(LLAMA_8B)
    assert (shape.n_layers, shape.d_model, shape.n_neurons, shape.vocab) == (32, 4096, 14336, 128256)
    # Llama-3.1-8B has 8.03 B parameters; the config-only count (untied head, full-width k/v) is above it
    assert 8.03e9 <= shape.parameters < 9.0e9
    assert memory.shape_from_config({"model_type": "x"}) is None


def test_jobs_ask_for_what_their_work_needs():
    shape = memory.shape_from_config(LLAMA_8B)
    common = dict(cached_layers=1, examples=200, batch_tokens=16 * 128, shard_tokens=None)
    shallow = memory.caching_bytes(shape, deepest_layer=1, **common)
    deep = memory.caching_bytes(shape, deepest_layer=31, **common)
    # caching builds the blocks up to the deepest layer only: two blocks and the embeddings ~6 GB in float32,
    # all 32 blocks ~34 GB; the kept examples do not depend on the depth
    assert 5e9 < shallow["weights"] < 7e9 and 30e9 < deep["weights"] <= 4 * shape.parameters
    assert shallow["examples"] == deep["examples"]
    # x rows are bounded by the shard's tokens as well as by neurons x examples
    capped = memory.caching_bytes(shape, deepest_layer=1, **{**common, "shard_tokens": 100_000})
    assert capped["examples"] < shallow["examples"]
    # the embedding job holds one layer's input projections (~0.9 GB), not the model's 32 GB...
    embed = memory.embedding_bytes(shape, 200)
    assert embed["weights"] == 2 * 4 * 2 * 14336 * 4096 < 4 * shape.parameters / 30
    # ...but at 200 examples per neuron the layer's embeddings themselves are 2.9 M rows x 8192 floats (94 GB)
    assert embed["embeddings"] == 3 * 4 * 14336 * 200 * 2 * 4096
    assert memory.caching_mb(None, deepest_layer=0, **common) == memory.DEFAULT_MB


def test_shape_from_a_prepared_manifest(tmp_path):
    (tmp_path / "neuron_embeddings.json").write_text(json.dumps(
        {"n_layers": 3, "d_model": 32, "n_neurons": 48, "n_projections": 2, "parameters": 30000}))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 3, "vocab_size": 300}))
    shape = memory.model_shape(tmp_path, None)
    assert (shape.n_layers, shape.d_model, shape.n_neurons, shape.n_projections, shape.parameters, shape.vocab) == (
        3, 32, 48, 2, 30000, 300)


def test_dry_run_defers_memory_until_the_model_is_prepared(tiny_llama, tiny_corpus, tmp_path):
    """Before prepare_model and the corpus, a caching job's mem_mb is <TBD> (not a guess); after, a number from the
    manifest and the shard's size."""
    config = tiny_config(tiny_llama, tiny_corpus)
    proc = run_snakemake(tmp_path, config, "-n", "-p")
    text = proc.stdout + proc.stderr
    block = text[text.index("rule cache_activations"):][:1500]
    assert "mem_mb=<TBD>" in block and "gpu_mem_mb=<TBD>" in block
    run_snakemake(tmp_path, config, "results/tiny/model", "results/tiny/corpus/documents.parquet")
    text = (lambda p: p.stdout + p.stderr)(run_snakemake(tmp_path, config, "-n"))
    block = text[text.index("rule cache_activations"):][:1500]
    assert "<TBD>" not in block
    mem = int(re.search(r"(?<!\w)mem_mb=(\d+)", block).group(1))
    assert memory.RUNTIME_MB <= mem < memory.RUNTIME_MB + 200  # a 3-layer, 32-wide model needs next to nothing


def test_one_pass_candidates_bound():
    """The caching job's memory counts the one-pass selection's candidates, not just the final cap."""
    from neuron_embeddings.memory import one_pass_candidates

    assert one_pass_candidates(200, 50) == 200  # fewer eligible than cap: all kept, as two passes would
    assert one_pass_candidates(200, 10_000) == 983  # 200 x (1 + ln 50)
    assert one_pass_candidates(200, 10**7) < 12 * 200
