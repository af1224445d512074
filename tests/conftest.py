"""Shared fixtures: a tiny local checkpoint with its own tokenizer, and a runner for the real workflow."""

from __future__ import annotations

import os
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
