"""Bad input: each case gets one line naming the file, key or value, fails before heavy work where it can, and
leaves finished outputs alone.

Most cases call the checks and stage functions directly (fast); a few go through Snakemake to show the whole
path: the exit status, the message on the console, no job started, no finished output touched.
"""

from __future__ import annotations

import copy
import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, copy_run, run_snakemake, tiny_config, write_corpus
from neuron_embeddings import storage
from neuron_embeddings.checks import check_config, fill_defaults
from neuron_embeddings.errors import PipelineError

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def startup_error(config: dict) -> str:
    """What the workflow says before any job: the schema check, then the other startup checks."""
    def both():
        check_config(fill_defaults(config, SCHEMA))

    return one_line_error(both)


@pytest.fixture()
def base(tiny_llama, tiny_corpus) -> dict:
    return tiny_config(tiny_llama, tiny_corpus)


def edited(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return config


# (config key, bad value, what the one line must name)
CONFIG_CASES = [
    ("colour", "red", ["'colour'", "unknown key"]),  # unknown key, top level
    ("corpus.shards", 4, ["corpus", "'shards'"]),  # unknown key, nested (a typo of n_shards)
    ("corpus.window_tokens", "sixteen", ["corpus.window_tokens", '"sixteen"', "not of type 'integer'"]),
    ("layers", "2", ["layers", '"2"']),  # wrong type: a string, not a list
    ("corpus.n_shards", 0, ["corpus.n_shards", "0", "minimum"]),  # zero size
    ("selection.top_k", -3, ["selection.top_k", "-3"]),  # negative size
    ("activations.batch_size", 0, ["activations.batch_size", "0"]),
    ("layers", [0, 7], ["layers", "[7]", "0..2"]),  # layer index out of range (the model has 3)
    ("layers", [0, 0], ["layers", "[0, 0]", "non-unique"]),
    ("clustering.threshold", 1.5, ["clustering.threshold", "1.5", "maximum of 1"]),  # outside [-1, 1]
    ("clustering.threshold", {"default": 0.3, "per_layer": {"2": -1.2}}, ["clustering.threshold.per_layer.2", "-1.2"]),
    ("run", "my/run", ["run", '"my/run"']),  # would escape results/
    ("run", "..", ["run", '".."']),  # would write results/.. itself
    ("selection.top_k", 6000, ["selection.top_k", "6000", "maximum of 5000"]),  # more than clustering can hold
    ("corpus.window_tokens", 256, ["corpus.window_tokens", "256", "128 positions"]),  # longer than the model
    ("corpus.min_window_tokens", 40, ["corpus.min_window_tokens", "40", "16"]),
    ("model.source", KeyError, ["model", "'source' is a required property"]),
    ("models", [{"name": "a", "source": "gpt2"}], ["model", "models", "not both"]),  # not the whole config dumped
    ("model", KeyError, ["model", "models", "found neither"]),
    ("corpus.sources.0.encoding", "utf-99", ["corpus.sources[0].encoding", "'utf-99'"]),  # was a LookupError traceback in tokenize_corpus
    ("selection", {"mode": "threshold", "passes": 1, "quantiles": {"bins": 2, "per_bin": 1}},
     ["selection.passes", "quantiles"]),  # bins are fractions of the final max: one pass cannot sample them
]


@pytest.mark.parametrize("key, value, names", CONFIG_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CONFIG_CASES])
def test_bad_config_value_is_named_in_one_line(base, key, value, names):
    message = startup_error(edited(base, key, value))
    for fragment in names:
        assert fragment in message, message


def test_corpus_path_matching_nothing(base, tmp_path):
    config = edited(base, "corpus.sources", [{"path": str(tmp_path / "missing-*.jsonl")}])
    assert "corpus.sources[0].path" in startup_error(config) and "missing-*.jsonl" in startup_error(config)


def test_empty_corpus_files(base, tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    config = edited(base, "corpus.sources", [{"path": str(tmp_path / "*.txt")}])
    assert "only empty files" in startup_error(config)


def test_model_path_that_does_not_exist(base, tmp_path):
    message = startup_error(edited(base, "model.source", str(tmp_path / "no-such-model")))
    assert message.startswith("model.source") and "no-such-model" in message and "does not exist" in message


def test_architecture_without_adapter(base, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "num_hidden_layers": 2})
    )
    message = startup_error(edited(base, "model.source", str(tmp_path)))
    assert "BertForMaskedLM" in message and "'bert'" in message and "causal" in message


def test_gguf_file_that_is_not_gguf(base, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    config = edited(edited(base, "model.source", str(tmp_path)), "model.gguf_file", "model.gguf")
    message = startup_error(config)
    assert "model.gguf_file" in message and "model.gguf" in message and "not a GGUF file" in message


# --- corpus content: found while tokenizing, the first job after the model ---------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def corpus_error(tokenizer, source: dict, out: Path, min_window_tokens: int = 2) -> str:
    from neuron_embeddings.corpus import CorpusSettings, build_corpus

    settings = CorpusSettings(window_tokens=16, n_shards=1, max_tokens=None, prepend_bos="auto",
                              min_window_tokens=min_window_tokens)
    message = one_line_error(build_corpus, [source], tokenizer, settings, out, ["000"])
    assert not (out / "documents.parquet").exists() and not (out / "shard-000.parquet").exists()
    return message


def test_undecodable_bytes_in_a_text_file(tokenizer, tmp_path):
    (tmp_path / "ok.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfe def")
    message = corpus_error(tokenizer, {"path": str(tmp_path / "*.txt")}, tmp_path / "out")
    assert "bad.txt" in message and "offset 3" in message and "utf-8" in message


def test_jsonl_line_that_is_not_json(tokenizer, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    message = corpus_error(tokenizer, {"path": str(tmp_path / "docs.jsonl")}, tmp_path / "out")
    assert "docs.jsonl:2" in message and "not valid JSON" in message


def test_jsonl_line_without_the_text_field(tokenizer, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    message = corpus_error(tokenizer, {"path": str(tmp_path / "docs.jsonl")}, tmp_path / "out")
    assert "docs.jsonl:2" in message and "'text'" in message


def test_parquet_without_the_text_column(tokenizer, tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "docs.parquet")
    message = corpus_error(tokenizer, {"path": str(tmp_path / "docs.parquet")}, tmp_path / "out")
    assert "docs.parquet" in message and "no column 'text'" in message and "body" in message


def test_parquet_text_column_that_is_not_text(tokenizer, tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "docs.parquet")
    message = corpus_error(tokenizer, {"path": str(tmp_path / "docs.parquet")}, tmp_path / "out")
    assert "docs.parquet" in message and "'text'" in message and "int64" in message


def test_corpus_of_whitespace_only(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("   \n\t\n  ")
    (tmp_path / "b.txt").write_text("\n\n")
    message = corpus_error(tokenizer, {"path": str(tmp_path / "*.txt")}, tmp_path / "out")
    assert message.startswith("corpus:") and "no tokens" in message and "whitespace" in message


def test_documents_shorter_than_a_window(tokenizer, tmp_path):
    from neuron_embeddings.corpus import CorpusSettings, build_corpus

    # Short documents among others are fine: they give short windows.
    (tmp_path / "short.txt").write_text("hi")
    (tmp_path / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 5)
    settings = CorpusSettings(window_tokens=16, n_shards=1, max_tokens=None, prepend_bos="auto")
    assert build_corpus([{"path": str(tmp_path / "*.txt")}], tokenizer, settings, tmp_path / "ok", ["000"])["windows"] > 1
    # A corpus whose every document is shorter than corpus.min_window_tokens has nothing to cache: named.
    only_short = tmp_path / "short"
    only_short.mkdir()
    (only_short / "a.txt").write_text("hi")
    message = corpus_error(tokenizer, {"path": str(only_short / "*.txt")}, tmp_path / "out", min_window_tokens=8)
    assert "corpus.min_window_tokens=8" in message


# --- stored files: truncated, foreign, written by an older version ----------------------------------------


def test_truncated_activation_cache(reference_run, tmp_path):
    workdir, config = reference_run
    cache = next((workdir / "results" / config["run"] / "activations").rglob("layer-0.safetensors"))
    truncated = tmp_path / "layer-0.safetensors"
    truncated.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    message = one_line_error(storage.load_tensors, truncated)
    assert str(truncated) in message and "delete it to recompute" in message


def test_truncated_corpus_shard(reference_run, tmp_path):
    workdir, config = reference_run
    shard = workdir / "results" / config["run"] / "corpus" / "shard-000.parquet"
    truncated = tmp_path / "shard-000.parquet"
    truncated.write_bytes(shard.read_bytes()[:-100])
    message = one_line_error(storage.read_parquet, truncated)
    assert str(truncated) in message and "not a readable Parquet file" in message


def test_parquet_from_an_older_version(reference_run, tmp_path):
    from neuron_embeddings.clustering import cluster_layer

    workdir, config = reference_run
    table = pq.read_table(workdir / "results" / config["run"] / "embeddings" / "layer-0.parquet")
    old = tmp_path / "missing-column.parquet"
    pq.write_table(table.drop_columns(["pre_activations"]), old)
    message = one_line_error(cluster_layer, old, tmp_path / "clusters.parquet", 0, 0.3, "threshold_graph")
    assert str(old) in message and "'pre_activations' is missing" in message
    retyped = tmp_path / "wrong-type.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("neuron"), "neuron", table["neuron"].cast(pa.int64())), retyped)
    message = one_line_error(cluster_layer, retyped, tmp_path / "clusters.parquet", 0, 0.3, "threshold_graph")
    assert str(retyped) in message and "'neuron'" in message and "int64" in message
    assert not (tmp_path / "clusters.parquet").exists()


# --- writing: disk full -----------------------------------------------------------------------------------


def test_disk_full_during_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.parquet"
    table = pa.table({"x": np.arange(1000)})
    storage.write_parquet(table, target, {"stage": "test"})
    before = target.read_bytes()

    def full_disk(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.pq, "write_table", full_disk)
    message = one_line_error(storage.write_parquet, table, target, {"stage": "test"})
    assert str(target) in message and "No space left on device" in message
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.parquet"]  # no half-written temporary left


@pytest.fixture()
def small_filesystem(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount; CI has both)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_on_a_real_small_filesystem(small_filesystem):
    tensors = {"x": np.zeros(100_000, np.float32)}  # 400 KB into 64 KiB
    message = one_line_error(storage.save_tensors, tensors, small_filesystem / "layer-0.safetensors", {})
    assert "layer-0.safetensors" in message and "No space left on device" in message
    message = one_line_error(storage.write_parquet, pa.table({"x": np.random.rand(100_000)}), small_filesystem / "t.parquet", {})
    assert "t.parquet" in message and "No space left on device" in message
    assert list(small_filesystem.iterdir()) == []


# --- the model itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_activations(tiny_llama, tokenizer, tmp_path, poison):
    import torch
    from transformers import AutoModelForCausalLM

    from neuron_embeddings.activations import CacheSettings, cache_shard
    from neuron_embeddings.corpus import CorpusSettings, build_corpus
    from neuron_embeddings.models import ModelSource, prepare_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, :] = poison
    model.save_pretrained(tmp_path / "poisoned")
    tokenizer.save_pretrained(tmp_path / "poisoned")
    # caught when the model is prepared, before any caching...
    message = one_line_error(prepare_model, ModelSource(str(tmp_path / "poisoned")), tmp_path / "refused")
    assert "layer 1" in message and "NaN or inf" in message and not (tmp_path / "refused").exists()
    # ...and by the caching itself (overflow in a low-precision dtype, say): a prepared folder poisoned afterwards
    prepare_model(ModelSource(str(tiny_llama)), tmp_path / "model")
    model.save_pretrained(tmp_path / "model")
    write_corpus(tmp_path / "corpus", repeats=1)
    settings = CorpusSettings(window_tokens=16, n_shards=1, max_tokens=300, prepend_bos="auto")
    build_corpus([{"path": str(tmp_path / "corpus" / "*.txt")}], tokenizer, settings, tmp_path / "out", ["000"])
    cache = CacheSettings(top_k=4, context_before=2, context_after=1, window_tokens=16, device="cpu")
    out = {layer: tmp_path / f"layer-{layer}.safetensors" for layer in (0, 1)}
    message = one_line_error(cache_shard, tmp_path / "model", tmp_path / "out" / "shard-000.parquet", [0, 1], out, cache, shard="000")
    assert "layer 1" in message and "000" in message and "NaN or inf" in message
    assert not any(path.exists() for path in out.values())


def test_cuda_requested_without_cuda():
    import torch

    from neuron_embeddings.models import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = one_line_error(pick_device, "cuda:1")
    assert "activations.device" in message and "cuda:1" in message


# --- through Snakemake: the console, the exit status, nothing touched ------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_bad_config_stops_snakemake_before_any_job_and_touches_nothing(reference_run, tmp_path):
    ref, config = reference_run
    workdir = copy_run(ref, tmp_path / "run")
    results = workdir / "results"
    before = snapshot(results)
    cases = [
        (edited(config, "colour", "red"), "unknown key 'colour'"),
        (edited(config, "clustering.threshold", 1.5), "clustering.threshold: 1.5"),
        (edited(config, "layers", [0, 9]), "layers: [9] out of range"),
        (edited(config, "model.source", str(tmp_path / "gone")), "model.source: path"),
    ]
    for bad, expected in cases:
        proc = run_snakemake(workdir, bad, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-2000:]
        lines = [line for line in output.splitlines() if expected in line]
        assert len(lines) == 1 and lines[0].startswith("config.yaml: "), output[-2000:]
        assert "Traceback" not in output and "Select jobs to execute" not in output
    assert snapshot(results) == before


def test_bad_corpus_fails_in_the_first_job_with_its_log_and_keeps_the_model(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text("Plain text. " * 20)
    (corpus / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    config = tiny_config(tiny_llama, corpus, run="badcorpus")
    proc = run_snakemake(tmp_path, config, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {corpus / 'latin1.txt'}: bytes at offset 3 are not valid utf-8"], output[-3000:]
    assert "Error in rule tokenize_corpus" in output and "results/badcorpus/logs/tokenize_corpus.log" in output
    run = tmp_path / "results" / "badcorpus"
    assert (run / "model" / "neuron_embeddings.json").is_file()  # the finished model stays
    assert not (run / "corpus").exists() or not list((run / "corpus").glob("*.parquet"))
    assert not (run / "activations").exists()


def test_truncated_output_fails_its_reader_and_leaves_other_layers_alone(reference_run, tmp_path):
    ref, config = reference_run
    workdir = copy_run(ref, tmp_path / "run")
    run = workdir / "results" / config["run"]
    layer2 = {k: v for k, v in snapshot(run).items() if "layer-2" in k}
    embeddings = run / "embeddings" / "layer-0.parquet"
    embeddings.write_bytes(embeddings.read_bytes()[:-200])  # as a crashed copy or a full disk would leave it
    proc = run_snakemake(workdir, config, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and all(f"{Path('results') / config['run'] / 'embeddings' / 'layer-0.parquet'}: not a readable Parquet file" in e
                          for e in errors), output[-3000:]
    assert {k: v for k, v in snapshot(run).items() if "layer-2" in k} == layer2
    shutil.rmtree(workdir)


def test_a_per_layer_threshold_for_a_layer_not_run_is_a_warning(base):
    """Kept for a whole model and run on a subset of its layers, or a typo: said, but the run goes on."""
    from neuron_embeddings.checks import config_warnings

    config = edited(base, "clustering.threshold", {"default": 0.4, "per_layer": {"7": 0.2, "2": 0.3}})
    check_config(fill_defaults(config, SCHEMA))  # not an error
    (warning,) = config_warnings(fill_defaults(config, SCHEMA))
    assert "clustering.threshold.per_layer" in warning and "[7]" in warning and "\n" not in warning
    assert config_warnings(fill_defaults(base, SCHEMA)) == []
