"""Shared fixtures: a tiny local checkpoint with its own tokenizer, and a runner for the real workflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "A journey of a thousand miles begins with a single step.",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
    "Fortune favours the bold; <script>window.pwned=1</script> \"quotes\" & </div> stay text.",
]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, arch: str = "llama") -> Path:
    """A random-init checkpoint saved with save_pretrained: loaded like any user's local path or hub id."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=48, vocab_size=vocab, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "gpt2":
        config = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_inner=64, vocab_size=vocab, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
    else:
        config = GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               vocab_size=vocab, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_corpus(folder: Path, repeats: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(TEXTS * repeats):
        (folder / f"doc{i:03d}.txt").write_text(f"{i}: {text}")
    return folder


def tiny_config(model_dir: Path, corpus_dir: Path, run: str = "tiny", **overrides) -> dict:
    config = {
        "run": run,
        "model": {"source": str(model_dir)},
        "corpus": {
            "sources": [{"path": str(corpus_dir / "*.txt")}],
            "window_tokens": 16,
            "n_shards": 2,
            "max_tokens": 2000,
            "prepend_bos": "auto",
        },
        "layers": [0, 2],
        "activations": {"batch_size": 4, "device": "cpu", "dtype": "float32", "threads": 1, "gpus": 1},
        "selection": {"mode": "top_k", "top_k": 6, "context_before": 5, "context_after": 3},
        "clustering": {"method": "threshold_graph", "threshold": {"default": 0.3, "per_layer": {"2": 0.2}}},
        "report": {"neurons_shown": 2, "examples_per_cluster": 2},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def run_snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real workflow, with its config as workdir/config.yaml; results land in workdir/results/."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tiny-corpus"))


@pytest.fixture(scope="session")
def reference_run(tiny_llama, tiny_corpus, tmp_path_factory) -> tuple[Path, dict]:
    """One finished local run of tiny_config, shared by the whole session: treat it as read-only (dry runs are
    fine); a test that changes outputs works on a copy (copy_run)."""
    workdir = tmp_path_factory.mktemp("reference")
    config = tiny_config(tiny_llama, tiny_corpus)
    run_snakemake(workdir, config)
    return workdir, config


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a workdir (results and .snakemake metadata) with every mtime kept, so Snakemake sees the same run."""
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    return dst


def output_differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs' results (results/<run>/ folders): Parquet contents and metadata,
    safetensors tensors and metadata, JSON; other files only by presence. Logs and benchmarks are ignored."""
    import numpy as np
    import pyarrow.parquet as pq
    from safetensors import safe_open

    def files(root: Path) -> set[str]:
        skip = ("logs", "benchmarks")
        return {
            str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in skip and not p.name.startswith(".")
        }

    diffs = []
    names_a, names_b = files(a), files(b)
    diffs += [f"only in {a}: {n}" for n in sorted(names_a - names_b)]
    diffs += [f"only in {b}: {n}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        fa, fb = a / name, b / name
        if name.endswith(".parquet"):
            ta, tb = pq.read_table(fa), pq.read_table(fb)
            if not ta.equals(tb, check_metadata=True):
                diffs.append(f"{name}: tables differ")
        elif name.endswith(".safetensors"):
            with safe_open(str(fa), "numpy") as ha, safe_open(str(fb), "numpy") as hb:
                if ha.metadata() != hb.metadata() or set(ha.keys()) != set(hb.keys()):
                    diffs.append(f"{name}: metadata or tensor names differ")
                else:
                    for key in ha.keys():
                        ea, eb = ha.get_tensor(key), hb.get_tensor(key)
                        if not np.array_equal(ea, eb, equal_nan=ea.dtype.kind in "fc"):
                            diffs.append(f"{name}: tensor {key} differs")
        elif name.endswith(".json"):
            if json.loads(fa.read_text()) != json.loads(fb.read_text()):
                diffs.append(f"{name}: JSON differs")
    return diffs


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count (empty when there is nothing to do)."""
    text = proc.stdout + proc.stderr
    jobs: dict[str, int] = {}
    if "Job stats:" not in text:
        return jobs
    block = text.split("Job stats:", 1)[1].splitlines()
    for line in block[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
    return jobs


def scratch_copy(root: Path) -> Path:
    """The workflow and package, copied: an edit there changes the code hashes, not the repository."""
    shutil.copytree(REPO / "workflow", root / "workflow", symlinks=True)
    shutil.copytree(REPO / "src" / "neuron_embeddings", root / "src" / "neuron_embeddings",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "Snakefile", root / "Snakefile")
    os.symlink("workflow/profiles", root / "profiles")
    return root


def plan_with_edit(finished_run: tuple[Path, dict], copy: Path, module: str | list[str], edit, *targets: str) -> set[str]:
    """The rules a dry run of a finished run plans after `edit` (text -> text) of one module of the scratch copy,
    or of several at once; the modules are put back."""
    workdir, config = finished_run
    base = copy / "src" / "neuron_embeddings"
    originals: dict[Path, str] = {}
    for name in [module] if isinstance(module, str) else module:
        parts = name.split(".")[1:]
        path = base.joinpath(*parts).with_suffix(".py") if parts else base / "__init__.py"
        if not path.is_file():
            path = base.joinpath(*parts) / "__init__.py"
        originals[path] = path.read_text()
    try:
        for path, original in originals.items():
            changed = edit(original)
            assert changed != original
            path.write_text(changed)
        proc = run_snakemake(workdir, config, "-n", "--nolock", "-s", str(copy / "Snakefile"), *targets)
    finally:
        for path, original in originals.items():
            path.write_text(original)
    return set(planned_jobs(proc))


def pytest_collection_modifyitems(config, items):
    """Tests marked `extended` (more end-to-end runs of what the default suite already covers) run only with
    NE_EXTENDED_TESTS=1, so the default suite fits CI's time."""
    if os.environ.get("NE_EXTENDED_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="extended: set NE_EXTENDED_TESTS=1 to run")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)
