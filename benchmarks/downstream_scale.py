"""The stages after caching, on one layer of GPT2-small's shape: time and peak memory per stage, explorer size.

    PYTHONPATH=src python benchmarks/downstream_scale.py [--neurons 3072] [--examples 200] [--d-model 768]
        [--tokens 32768] [--vocab 8192] [--method threshold_graph] [--threshold 0.5] [--workdir DIR] [--keep]
        [--stages embeddings,clustering,metrics,importance,sweep,similar,explorer] [--timeout 600]
        [--profile STAGE,...] [--blas-threads 0]

Without --workdir everything goes to a temporary folder, removed at the end unless --keep. With --workdir, the
setup is made once and reused; --stages then reruns just those stages (their missing inputs are made first).
On 2 CPUs the setup takes ~6 minutes (caching 3,072 neurons on 32k tokens: ~70 s of CPU).

What it runs, every step with the pipeline's own functions, called as the workflow/scripts/*.py wrappers call them
(through runner.run_stage, so each logs as a workflow job would):

  setup (made once per workdir, reused with --workdir; not what the benchmark is about, but timed too):
    model        a random-init GPT-2 (GPT2Config defaults: d_model 768, 3,072 neurons, 12 heads; n_layer=1) and a
                 byte-level BPE tokenizer trained here on the corpus text (nothing is downloaded), save_pretrained
    prepare      models.prepare_model on it (the manifest, the verified MLP layout)
    corpus       corpus.build_corpus: Python's standard library and the fortunes (the demo's builtin sources),
                 a seeded sample of --tokens tokens in 128-token windows, 2 shards
    cache        activations.cache_shard per shard, selection top_k with k = --examples, context 20 / 10
    select       selection.merge_layer (top_k mode, repeated context windows dropped)
  measured against the targets:
    embeddings   embeddings.build_embeddings
    clustering   clustering.cluster_layer (--method, --threshold; default the paper's threshold graph at 0.5, the
                 author's GPT2-small layer-0 threshold, as configs/gpt2-small.yaml)
    metrics      metrics.layer_metrics (min_examples 5, stability 10 resamples of 0.8, seed 0: the defaults)
    importance   importance.compute_importance for the 2 most and 2 least polysemantic neurons (the demo's setting;
                 a GPU stage, here only because the explorer reads its table; no target)
    sweep        sweep.threshold_sweep (configs/gpt2-small.yaml's thresholds 0.05 0.1 0.2 0.3 0.5)
    similar      similar.similar_features (top 20, min similarity 0.5, faiss, 2 threads)
    explorer     explorer.build_explorer (configs/gpt2-small.yaml's explorer settings)

Each stage runs in a fresh Python process, with OMP/OPENBLAS/MKL_NUM_THREADS set as Snakemake's `script:` sets
them (the rule's threads: 1 for every stage here but cache, importance and similar, which get 2; --blas-threads
overrides). Columns: `seconds` and `cpu s` are the stage function's wall and CPU time (its package module imported
before the clock starts, as a workflow script imports it at the top); `proc wall` is the whole process (start-up,
imports, run_stage's set-up); peak RSS is the process's ru_maxrss (os.wait4), so it includes the interpreter and
its imports (torch, ~0.4 GB, only in the stages that use it: embeddings, importance), as a workflow job's would.
`met?` judges the wall seconds, `cpu ok?` the CPU seconds (fairer on a loaded machine). The load average is printed before and after. A stage still running after
--timeout seconds is killed (SIGTERM, then SIGKILL) and the stages that need its output are skipped. --profile
STAGE runs that stage under cProfile and prints its top functions (the profile stays in WORKDIR/bench/STAGE.prof).

Targets (project issue 13): embeddings + clustering + metrics <= 5 s for the layer, each other stage <= 30 s,
peak memory <= 4 GB per stage, the explorer for the layer <= 50 MB on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"

LAYER = 0
WINDOW = 128
SHARDS = ["000", "001"]
SETUP = ["model", "prepare", "corpus", "cache", "select"]
MEASURED = ["embeddings", "clustering", "metrics", "importance", "sweep", "similar", "explorer"]
ALL = SETUP + MEASURED
NEEDS = {
    "model": [], "prepare": ["model"], "corpus": ["prepare"], "cache": ["corpus"], "select": ["cache"],
    "embeddings": ["select"], "clustering": ["embeddings"], "metrics": ["clustering"],
    "importance": ["metrics"], "sweep": ["embeddings"], "similar": ["clustering"],
    "explorer": ["metrics", "importance", "sweep", "similar"],
}
SWEEP_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5]
EXPLORER = {"examples_per_cluster": 10, "max_clusters": 30, "context_before": 20, "context_after": 10,
            "block_size": 64, "featured": 8, "search_hits": 50}
IMPORTANCE = {"neurons": 2, "examples_per_cluster": 1, "max_clusters": 30, "batch_size": 64, "device": "cpu",
              "dtype": "float32"}
CORPUS_SOURCES = [
    {"builtin": "python-stdlib", "seed": 0, "max_documents": 400},
    {"builtin": "fortunes", "seed": 0, "max_documents": 3000},
]
MB = 1024 * 1024
RSS_TARGET_MB = 4096
SUM_TARGET_S = 5.0
STAGE_TARGET_S = 30.0
EXPLORER_TARGET_MB = 50.0


class Paths:
    def __init__(self, root: Path):
        self.root = root
        self.source_model = root / "source-model"
        self.model = root / "model"
        self.corpus = root / "corpus"
        self.documents = self.corpus / "documents.parquet"
        self.shards = [self.corpus / f"shard-{s}.parquet" for s in SHARDS]
        self.caches = [root / "activations" / f"shard-{s}" / f"layer-{LAYER}.safetensors" for s in SHARDS]
        self.selection = root / "selection" / f"layer-{LAYER}.safetensors"
        self.embeddings = root / "embeddings" / f"layer-{LAYER}.parquet"
        self.embedding_weights = root / "embeddings" / f"layer-{LAYER}.weights.safetensors"
        self.clusters = root / "clusters" / f"layer-{LAYER}.parquet"
        self.metrics = root / "metrics" / f"layer-{LAYER}.parquet"
        self.importance = root / "importance" / f"layer-{LAYER}.parquet"
        self.sweep = root / "sweep" / f"layer-{LAYER}.parquet"
        self.similar = root / "similar" / f"layer-{LAYER}.parquet"
        self.explorer = root / "explorer"
        self.bench = root / "bench"
        self.logs = root / "logs"

    def output(self, stage: str) -> Path:
        return {
            "model": self.source_model / "config.json", "prepare": self.model, "corpus": self.shards[-1],
            "cache": self.caches[-1], "select": self.selection, "embeddings": self.embeddings,
            "clustering": self.clusters, "metrics": self.metrics, "importance": self.importance,
            "sweep": self.sweep, "similar": self.similar, "explorer": self.explorer,
        }[stage]


# ---------------------------------------------------------------------------------------------------- the stages
# Each runs in its own process (child mode) and returns what the stage function returned.


def corpus_texts(limit_chars: int) -> list[str]:
    from neuron_embeddings.corpus import iter_source

    texts, total = [], 0
    for index, source in enumerate(CORPUS_SOURCES):
        for doc in iter_source(index, source):
            texts.append(doc.text)
            total += len(doc.text)
            if total >= limit_chars * (index + 1) / len(CORPUS_SOURCES):
                break
    return texts


def stage_model(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    """A random-init GPT-2 of the asked shape and a byte-level BPE tokenizer trained on the corpus text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    folder = p.source_model
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab"], special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(4_000_000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    d = cfg["d_model"]
    config = GPT2Config(n_layer=1, n_embd=d, n_head=12 if d % 12 == 0 else 1, n_inner=cfg["neurons"],
                        vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return {"vocab": len(fast), "d_model": d, "neurons": cfg["neurons"]}


def stage_prepare(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    from neuron_embeddings.models import ModelSource, prepare_model

    info = asdict(prepare_model(ModelSource(source=str(p.source_model)), p.model))
    return {k: info[k] for k in ("architecture", "n_layers", "d_model", "n_neurons", "activation")}


def stage_corpus(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from neuron_embeddings.corpus import CorpusSettings, build_corpus

    settings = CorpusSettings(window_tokens=WINDOW, n_shards=len(SHARDS), max_tokens=cfg["tokens"],
                              prepend_bos="auto", min_window_tokens=2, seed=0)
    summary = build_corpus(CORPUS_SOURCES, AutoTokenizer.from_pretrained(p.model), settings, p.corpus, SHARDS)
    return {k: summary[k] for k in ("documents", "windows", "tokens")}


def stage_cache(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.activations import CacheSettings, cache_shard

    settings = CacheSettings(top_k=cfg["examples"], context_before=20, context_after=10, window_tokens=WINDOW,
                             batch_size=16, device="cpu", dtype="float32", store_dtype="float32", mode="top_k",
                             histogram_stride=8, sign="auto")
    out = {}
    for name, shard, cache in zip(SHARDS, p.shards, p.caches):
        out[name] = cache_shard(p.model, shard, [LAYER], {LAYER: cache}, settings, shard=name)
    return out


def stage_select(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.selection import merge_layer

    return merge_layer(p.caches, p.selection, cfg["examples"], LAYER, mode="top_k", quantile_per_bin=0,
                       corpus_shards=list(p.shards))


def stage_embeddings(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.embeddings import build_embeddings

    return build_embeddings(p.selection, p.model, list(p.shards), p.embeddings, LAYER, weights_path=p.embedding_weights)


def stage_clustering(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.clustering import cluster_layer

    return cluster_layer(p.embeddings, p.clusters, LAYER, cfg["threshold"], cfg["method"], selection_path=p.selection,
                         weights_path=p.embedding_weights)


def stage_metrics(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.metrics import layer_metrics

    summary = layer_metrics(p.embeddings, p.clusters, p.selection, p.metrics, LAYER, min_examples=5, resamples=10,
                            fraction=0.8, seed=0, weights_path=p.embedding_weights)
    return {"live": summary["live"], "left_out": summary["left_out"],
            "clusters_per_neuron_mean": summary["clusters_per_neuron_mean"],
            "clusters_per_neuron_median": summary["clusters_per_neuron_median"],
            "examples_per_live_neuron": summary["examples_per_live_neuron"]}


def stage_importance(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.importance import ImportanceSettings, compute_importance

    return compute_importance(p.model, list(p.shards), p.embeddings, p.clusters, p.metrics, p.importance, LAYER,
                              ImportanceSettings(**IMPORTANCE))


def stage_sweep(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.sweep import threshold_sweep

    return threshold_sweep(p.embeddings, p.sweep, LAYER, SWEEP_THRESHOLDS, cfg["method"], selection_path=p.selection,
                           weights_path=p.embedding_weights)


def stage_similar(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.similar import similar_features

    return similar_features(p.selection, p.clusters, p.similar, LAYER, top_k=20, min_similarity=0.5,
                            backend="faiss", threads=2)


def stage_explorer(p: Paths, cfg: dict[str, Any]) -> dict[str, Any]:
    from neuron_embeddings.explorer import ExplorerSettings, LayerInputs, build_explorer

    inputs = LayerInputs(embeddings=p.embeddings, clusters=p.clusters, metrics=p.metrics, importance=p.importance,
                         similar=p.similar, sweep=p.sweep, selection=p.selection)
    return build_explorer(p.explorer, "downstream-scale", {LAYER: inputs}, p.documents, ExplorerSettings(**EXPLORER),
                          importance_settings=dict(IMPORTANCE), comparison_path=None)


STAGES: dict[str, Callable[[Paths, dict[str, Any]], dict[str, Any]]] = {
    name: globals()[f"stage_{name}"] for name in ALL
}
THREADS = {"cache": 2, "importance": 2, "similar": 2}  # as the workflow's rules give them (threads:; default 1)
# Snakemake runs a rule's script with these set to the rule's threads (snakemake/shell.py), 1 for a rule without
# `threads:`: so clustering, metrics, sweep... run with single-threaded BLAS in the workflow.
BLAS_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS")
MODULES = {"prepare": ["models"], "corpus": ["corpus"], "cache": ["activations"], "select": ["selection"],
           "embeddings": ["embeddings"], "clustering": ["clustering"], "metrics": ["metrics"],
           "importance": ["importance"], "sweep": ["sweep"], "similar": ["similar"], "explorer": ["explorer"]}


def child(stage: str, root: Path, profile: bool) -> None:
    """Child mode: run one stage through run_stage, write its timing and result to WORKDIR/bench/STAGE.json."""
    from neuron_embeddings.runner import quiet_hub, run_stage

    quiet_hub()
    p = Paths(root)
    cfg = json.loads((p.bench / "config.json").read_text())
    p.logs.mkdir(parents=True, exist_ok=True)
    for path in (p.output(stage), p.output(stage).parent):
        path.parent.mkdir(parents=True, exist_ok=True)

    clock: dict[str, float] = {}

    def fn() -> dict[str, Any]:  # timed alone: run_stage's own set-up (logging, torch settings) is not the stage
        clock["start"], clock["cpu"] = time.perf_counter(), time.process_time()
        out = STAGES[stage](p, cfg)
        clock["seconds"], clock["cpu"] = time.perf_counter() - clock["start"], time.process_time() - clock["cpu"]
        return out

    import importlib

    for module in MODULES.get(stage, ()):  # imported before the clock starts, as a workflow script does
        importlib.import_module(f"neuron_embeddings.{module}")
    start = time.perf_counter()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(run_stage, stage, fn, str(p.logs / f"{stage}.log"), THREADS.get(stage))
        profiler.dump_stats(str(p.bench / f"{stage}.prof"))
    else:
        result = run_stage(stage, fn, str(p.logs / f"{stage}.log"), THREADS.get(stage))
    (p.bench / f"{stage}.json").write_text(json.dumps(
        {"seconds": clock["seconds"], "cpu": clock["cpu"], "run_stage_seconds": time.perf_counter() - start,
         "result": result}, default=str))


# ---------------------------------------------------------------------------------------------------- the parent


def run_child(stage: str, p: Paths, timeout: float, profile: bool, blas_threads: int) -> dict[str, Any]:
    """Run a stage in a fresh process; its wall time, exit status and peak RSS (wait4's ru_maxrss, KiB)."""
    result_file = p.bench / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in BLAS_VARS:
        if blas_threads < 0:
            env.pop(name, None)
        else:
            env[name] = str(blas_threads or THREADS.get(stage, 1))
    cmd = [sys.executable, str(HERE), "--child", stage, "--workdir", str(p.root)] + (["--child-profile"] if profile else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = False
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > timeout and not killed:
            killed = True
            os.kill(proc.pid, signal.SIGTERM)
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.2)
            if pid:
                break
            os.kill(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait on a reaped pid
    reader.join(timeout=5)
    row: dict[str, Any] = {"stage": stage, "wall": wall, "rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
                           "killed": killed, "proc_cpu": usage.ru_utime + usage.ru_stime}
    if result_file.exists():
        row.update(json.loads(result_file.read_text()))
    else:
        row["seconds"] = row["cpu"] = None
        row["tail"] = "".join(output)[-3000:]
    return row


def folder_size(path: Path) -> tuple[int, int, int]:
    files = [f for f in path.rglob("*") if f.is_file()]
    sizes = [f.stat().st_size for f in files]
    return sum(sizes), len(files), max(sizes, default=0)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]], p: Paths) -> None:
    """seconds / cpu s: the stage function's wall and CPU time; proc wall: the whole process (start-up, imports);
    met? judges the wall seconds, cpu ok? the CPU seconds (fairer on a loaded machine; a 2-thread stage can use
    more CPU than wall time)."""
    by = {r["stage"]: r for r in rows}
    header = (f"{'stage':<24} {'seconds':>8} {'cpu s':>7} {'proc wall':>9} {'peak RSS MB':>11}  {'target':<27} "
              f"{'met?':<4} {'cpu ok?':<7}")
    lines = [header, "-" * len(header)]

    def ok(flag: bool | None) -> str:
        return "-" if flag is None else ("yes" if flag else "NO")

    def line(name: str, r: dict[str, Any], target: str, limit: float | None) -> None:
        secs, cpu, failed = r.get("seconds"), r.get("cpu"), r.get("seconds") is None
        rss_ok = r["rss_mb"] <= RSS_TARGET_MB
        met = ok(rss_ok and not failed and (limit is None or secs <= limit))
        cpu_met = "-" if limit is None or failed else ok(rss_ok and cpu <= limit)
        lines.append(f"{name:<24} {fmt(secs):>8} {fmt(cpu):>7} {fmt(r['wall']):>9} {fmt(r['rss_mb'], 0):>11}  "
                     f"{target:<27} {met:<4} {cpu_met:<7}")

    mem = f"<= {RSS_TARGET_MB} MB"
    for r in rows:
        stage = r["stage"]
        name = stage + (" (KILLED)" if r["killed"] else " (FAILED)" if r.get("seconds") is None else "")
        if stage in SETUP:
            line(name, r, f"(setup) {mem}", None)
        elif stage in ("embeddings", "clustering", "metrics"):
            line(name, r, f"(in the sum) {mem}", None)
        elif stage == "importance":
            line(name, r, f"(GPU stage) {mem}", None)
        else:
            line(name, r, f"<= {STAGE_TARGET_S:g} s, {mem}", STAGE_TARGET_S)
    trio = [by.get(s) for s in ("embeddings", "clustering", "metrics")]
    if all(t is not None for t in trio):
        total = {k: (None if any(t[k] is None for t in trio) else sum(t[k] for t in trio)) for k in ("seconds", "cpu")}
        line("embed+cluster+metrics", {**total, "wall": sum(t["wall"] for t in trio),
                                       "rss_mb": max(t["rss_mb"] for t in trio)}, f"<= {SUM_TARGET_S:g} s, {mem}",
             SUM_TARGET_S)
    if "explorer" in by and p.explorer.is_dir():
        total, files, largest = folder_size(p.explorer)
        lines.append(f"{'explorer size on disk':<24} {total / MB:.1f} MB in {files} files (largest {largest / MB:.2f} MB);"
                     f" target <= {EXPLORER_TARGET_MB:g} MB: met? {ok(total / MB <= EXPLORER_TARGET_MB)}")
    if "embeddings" in by and p.embeddings.exists():
        lines.append(write_floor(p.embeddings))
    print("\n".join(lines))


def write_floor(table: Path) -> str:
    """How long writing the embeddings file's size in plain bytes takes on this machine's file system: the floor
    under the embeddings stage, whatever its format (on a VM the page cache itself can fill at well under 1 GB/s)."""
    size = table.stat().st_size
    block = os.urandom(1 << 20) * 64
    probe = table.with_name("write-floor.tmp")
    start = time.perf_counter()
    try:
        with open(probe, "wb") as out:
            for _ in range(0, size, len(block)):
                out.write(block)
        seconds = time.perf_counter() - start
    finally:
        probe.unlink(missing_ok=True)
    return (f"{'write floor':<24} {seconds:8.1f} s to write the embeddings file's {size / 1e9:.2f} GB as raw bytes here "
            f"({size / 1e9 / seconds:.2f} GB/s): the part of the embeddings stage no format change removes")


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    for key in ("cumulative", "tottime"):
        print(f"\n--- {path.name}: top {top} by {key}")
        pstats.Stats(str(path)).strip_dirs().sort_stats(key).print_stats(top)


def stages_to_run(requested: list[str], p: Paths) -> list[str]:
    """The requested stages, plus any stage they need whose output is missing, in pipeline order."""
    wanted = set(requested)
    todo = list(requested)
    while todo:
        for need in NEEDS[todo.pop()]:
            if need not in wanted and not p.output(need).exists():
                wanted.add(need)
                todo.append(need)
    return [s for s in ALL if s in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, default=3072, help="MLP neurons of the layer (GPT2-small: 3072)")
    parser.add_argument("--examples", type=int, default=200, help="examples per neuron (selection top_k)")
    parser.add_argument("--d-model", type=int, default=768, help="model width (GPT2-small: 768)")
    parser.add_argument("--tokens", type=int, default=32768, help="corpus tokens to cache (128-token windows)")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained for the tokenizer")
    parser.add_argument("--method", default="threshold_graph", choices=["threshold_graph", "agglomerative"])
    parser.add_argument("--threshold", type=float, default=0.5, help="clustering threshold (layer 0 of GPT2-small: 0.5)")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (reused: setup runs only if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--stages", default=",".join(MEASURED),
                        help=f"comma-separated, of {','.join(ALL)}; missing inputs are made first (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a stage is killed")
    parser.add_argument("--profile", default="", help="comma-separated stages to run under cProfile")
    parser.add_argument("--blas-threads", type=int, default=0,
                        help="OMP/OPENBLAS/MKL_NUM_THREADS per stage: 0 = the rule's threads, as Snakemake sets them "
                             "(1 unless the rule says threads:); -1 = unset (the library default: every CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir, args.child_profile)
        return

    requested = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(requested) - set(ALL))
    if unknown:
        parser.error(f"unknown stages: {', '.join(unknown)} (known: {', '.join(ALL)})")
    profiled = {s.strip() for s in args.profile.split(",") if s.strip()}
    temporary = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="downstream-scale-")) if temporary else args.workdir.resolve()
    p = Paths(root)
    p.bench.mkdir(parents=True, exist_ok=True)
    cfg = {"neurons": args.neurons, "examples": args.examples, "d_model": args.d_model, "tokens": args.tokens,
           "vocab": args.vocab, "method": args.method, "threshold": args.threshold}
    previous = p.bench / "config.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        shape = ("neurons", "examples", "d_model", "tokens", "vocab")
        if any(old.get(k) != cfg[k] for k in shape):
            parser.error(f"{root} holds a run of another shape ({ {k: old.get(k) for k in shape} }): use another --workdir")
    previous.write_text(json.dumps(cfg))

    print(f"workdir {root}; {args.neurons} neurons x {args.examples} examples, d_model {args.d_model}, "
          f"{args.tokens} corpus tokens; clustering {args.method} at {args.threshold}; BLAS threads per stage: "
          f"{'library default' if args.blas_threads < 0 else args.blas_threads or 'as the workflow (rule threads)'}",
          flush=True)
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min) on {os.cpu_count()} CPUs", flush=True)
    rows = []
    failed: set[str] = set()
    try:
        for stage in stages_to_run(requested, p):
            if any(need in failed for need in NEEDS[stage]):
                failed.add(stage)
                print(f"  {stage:<11} skipped: an input stage failed", flush=True)
                continue
            row = run_child(stage, p, args.timeout, stage in profiled, args.blas_threads)
            rows.append(row)
            status = "killed after timeout" if row["killed"] else f"rc {row['rc']}"
            print(f"  {stage:<11} {fmt(row['seconds'])} s, cpu {fmt(row['cpu'])} s (process wall {row['wall']:.1f} s), peak RSS {row['rss_mb']:.0f} MB,"
                  f" {status}: {json.dumps(row.get('result'), default=str)[:400]}", flush=True)
            if row["seconds"] is None:
                failed.add(stage)
                print(row.get("tail", ""), flush=True)
        print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}\n")
        print_table(rows, p)
        for stage in profiled:
            if (p.bench / f"{stage}.prof").exists():
                print_profile(p.bench / f"{stage}.prof")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nkept: {root}")


if __name__ == "__main__":
    main()
