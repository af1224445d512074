"""The command line's verify: the embedding invariant checked from a Parquet file alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from neuron_embeddings import schemas
from neuron_embeddings.cli import main
from neuron_embeddings.storage import write_parquet


def embeddings_file(path, pre_shift: float) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 2 * 4)).astype(np.float32)
    biases = rng.normal(size=(3, 2)).astype(np.float32)
    pre = emb.reshape(3, 2, 4).astype(np.float64).sum(-1) + biases + pre_shift

    def fixed(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).astype(np.float32)), a.shape[1])

    table = pa.Table.from_pydict(
        {
            "layer": pa.array([0, 0, 0], pa.int16()), "neuron": pa.array([0, 0, 1], pa.int32()),
            "expert": pa.nulls(3, pa.int32()),
            "example_rank": pa.array([0, 1, 0], pa.int16()), "sample": ["top_k"] * 3,
            "token_index": pa.array([1, 2, 3], pa.int64()), "document": pa.array([0, 0, 0], pa.int64()),
            "doc_position": pa.array([1, 2, 3], pa.int32()), "token_id": pa.array([5, 6, 7], pa.int32()),
            "token": ["a", "b", "c"], "activation": pa.array([1.0, 0.5, 0.2], pa.float32()),
            "pre_activations": fixed(pre), "biases": fixed(biases), "embedding": fixed(emb),
            "context_tokens": [["a"], ["b"], ["c"]], "context_activations": pa.array([[1.0], [0.5], [0.2]], pa.list_(pa.float32())),
            "context_center": pa.array([0, 0, 0], pa.int16()),
        },
        schema=schemas.embeddings_schema(2, 4),
    )
    write_parquet(table, path, {"cache_settings": {"dtype": "float32"}})


def test_verify_accepts_a_consistent_file(tmp_path, capsys):
    embeddings_file(tmp_path / "ok.parquet", 0.0)
    assert main(["verify", str(tmp_path / "ok.parquet")]) == 0
    assert "invariant holds" in capsys.readouterr().out


def test_verify_rejects_a_file_whose_sums_disagree(tmp_path, capsys):
    embeddings_file(tmp_path / "bad.parquet", 0.5)
    assert main(["verify", str(tmp_path / "bad.parquet")]) == 1
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "invariant fails" in err and err.count("\n") == 1


def test_configfile_is_the_whole_config_not_merged_over_the_demo(tiny_llama, tmp_path):
    """README: `snakemake --configfile FILE` runs FILE alone. Snakemake merges a Snakefile's `configfile:` under the
    command line's key by key, which gave a `model:` config the demo's `models:` too (refused as both) and would
    give any config the demo's SAE, analyses and explorer settings it leaves out."""
    import subprocess
    import yaml

    from conftest import REPO, SNAKEMAKE, tiny_config, write_corpus

    config = tiny_config(tiny_llama, write_corpus(tmp_path / "corpus"), run="own-config")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(path), "--printshellcmds"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "results/own-config/report/index.html" in out
    assert "train_sae" not in out and "compare_models" not in out  # the demo's SAE and its second model
