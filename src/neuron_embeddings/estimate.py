"""A dry-run estimate of a run, before submitting it: per stage the jobs, tokens, disk and GPU-hours.

    neuron-embeddings estimate --configfile configs/gpt2-small.yaml [--device cuda] [--json]

- Model shape (layers, d_model, neurons, projections, parameters) from the model itself, loaded once (or from
  the run's prepared folder when it exists).
- Corpus size by reading and tokenizing it the way the corpus stage does (exact for local files and the builtin
  corpora, capped by max_tokens; for a hub dataset with no cap, extrapolated from the first documents once the
  time budget runs out).
- Speed from a short calibration: the real caching functions (activations.stats_shard / cache_shard, the ones
  the workflow runs) on two small shards of real windows, on the configured device. Two sizes separate the
  per-job start-up (model load) from the per-token cost: job time = start-up + tokens x per-token cost.
- Disk from the shapes; for the caches, selections and embeddings an upper bound (every neuron keeps its full
  k examples, each at a distinct token; Parquet compression ignored).

The calibration runs where the command runs: on a login node without a GPU it measures the CPU, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .checks import selection_passes
from .errors import PipelineError
from .memory import one_pass_candidates

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@dataclass
class Stage:
    name: str
    jobs: int
    where: str  # "GPU" or "CPU" (or "local")
    tokens: int = 0
    disk_bytes: int = 0
    hours: float = 0.0  # job-hours; GPU-hours for GPU stages (x GPUs per job)
    note: str = ""


def selection_k(sel: dict[str, Any]) -> int:
    """Most examples a neuron keeps (top_k, or the threshold mode's cap plus its quantile examples)."""
    if sel["mode"] == "top_k":
        return int(sel["top_k"])
    quantiles = sel["quantiles"]
    return int(sel["cap"]) + int(quantiles["bins"]) * int(quantiles["per_bin"])


def count_corpus(config: dict[str, Any], tokenizer: Any, budget_s: float, keep_windows: int):
    """(documents, tokens, exact, sample windows, BOS in front) as the corpus stage would cut them."""
    from .corpus import bos_token_id, cut_windows, iter_documents

    corpus = config["corpus"]
    window, cap = corpus["window_tokens"], corpus["max_tokens"]
    bos = bos_token_id(tokenizer, corpus["prepend_bos"])
    min_tokens = corpus["min_window_tokens"]
    docs = tokens = 0
    sample: list[list[int]] = []
    start = time.perf_counter()
    for doc in iter_documents(corpus["sources"]):
        if cap is not None and tokens >= cap:
            return docs, min(tokens, cap), True, sample, bos is not None
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        pieces = cut_windows(ids, window, bos, min_tokens)
        docs += 1
        tokens += sum(len(w) for _, w in pieces)
        sample += [w for _, w in pieces][: max(0, keep_windows - len(sample))]
        if time.perf_counter() - start > budget_s:
            expected = sum(s.get("max_documents", 0) for s in corpus["sources"])
            if expected > docs and all("max_documents" in s for s in corpus["sources"]):
                tokens = int(tokens / docs * expected)
                docs = expected
            return docs, min(tokens, cap) if cap else tokens, False, sample, bos is not None
    return docs, min(tokens, cap) if cap else tokens, True, sample, bos is not None


def cache_settings(config: dict[str, Any], device: str, top_k: int):
    """The CacheSettings the workflow passes (workflow/rules/common.smk), for the keys this version has."""
    from .activations import CacheSettings

    sel, act = config["selection"], config["activations"]
    quantiles = sel["quantiles"]
    values = {
        "top_k": top_k, "window_tokens": config["corpus"]["window_tokens"],
        "context_before": sel["context_before"], "context_after": sel["context_after"],
        "mode": sel["mode"], "alpha": sel["alpha"], "cap": sel["cap"],
        "seed": sel["seed"], "passes": selection_passes(sel), "quantile_bins": quantiles["bins"],
        "quantile_per_bin": quantiles["per_bin"], "batch_size": act["batch_size"],
        "device": device, "dtype": act["dtype"], "store_dtype": act["store_dtype"],
        "histogram_stride": act["histogram_stride"],
    }
    return CacheSettings(**{f.name: values[f.name] for f in fields(CacheSettings) if f.name in values})


def calibrate(config: dict[str, Any], model_dir: Path, windows: list[list[int]], has_bos: bool, device: str,
              work: Path) -> dict[str, Any]:
    """Time the real caching functions on two shards of real windows: (start-up s, s per token) per pass."""
    import pyarrow as pa

    from . import schemas
    from .activations import cache_shard, stats_shard
    from .selection import merge_layer_stats
    from .storage import write_parquet

    layers = sorted(config["layers"])
    mode = config["selection"]["mode"]
    batch = config["activations"]["batch_size"]
    batch = 16 if batch == "auto" else int(batch)
    sizes = [min(len(windows), batch), min(len(windows), 4 * batch)]
    n_prefix = 1 if has_bos else 0
    results: dict[str, list[tuple[int, float]]] = {"stats": [], "cache": []}
    for size in sizes:
        rows = [{"window": i, "document": 0, "doc_start": 0, "n_prefix": n_prefix, "input_ids": w} for i, w in enumerate(windows[:size])]
        shard = work / f"calibration-{size}.parquet"
        write_parquet(pa.Table.from_pylist(rows, schema=schemas.WINDOWS), shard, {"stage": "calibration"})
        tokens = sum(len(w) for w in windows[:size])
        stats_paths = None
        settings = cache_settings(config, device, selection_k(config["selection"]))
        if mode == "threshold" and settings.passes == 2:
            out = {layer: work / f"stats-{size}-{layer}.safetensors" for layer in layers}
            start = time.perf_counter()
            stats_shard(model_dir, shard, layers, out, settings, shard="calibration")
            results["stats"].append((tokens, time.perf_counter() - start))
            stats_paths = {layer: work / f"merged-{size}-{layer}.safetensors" for layer in layers}
            for layer in layers:
                merge_layer_stats([out[layer]], stats_paths[layer], layer)
        out = {layer: work / f"cache-{size}-{layer}.safetensors" for layer in layers}
        start = time.perf_counter()
        cache_shard(model_dir, shard, layers, out, settings, shard="calibration", stats_paths=stats_paths)
        results["cache"].append((tokens, time.perf_counter() - start))
    return {name: fit_timings(points) for name, points in results.items() if points}


def fit_timings(points: list[tuple[int, float]]) -> dict[str, float]:
    """(start-up s, s per token) through the smallest and largest (tokens, seconds) timing. Where the larger run
    was not the slower one (timing noise, a first call's warm-up: a small model on a busy machine), the slope says
    nothing: the whole larger run's time per token is taken instead, an upper bound, never a rate of ~1e9 tokens/s
    and 0 GPU-hours."""
    (n1, t1), (n2, t2) = points[0], points[-1]
    if n2 > n1 and t2 > t1:
        per_token = (t2 - t1) / (n2 - n1)
    else:
        per_token = t2 / max(n2, 1)
    per_token = max(per_token, 1e-12)
    return {"startup_s": max(t1 - per_token * n1, 0.0), "s_per_token": per_token,
            "tokens_per_s": 1.0 / per_token, "calibration_tokens": n2}


def estimate(config: dict[str, Any], device: str | None = None, budget_s: float = 60.0) -> dict[str, Any]:
    from .checks import check_config, fill_defaults, model_entries
    from .models import MANIFEST, ModelSource, describe, load_prepared, pick_device, prepare_model

    config = fill_defaults(config, SCHEMA)
    check_config(config)
    reference = model_entries(config)[0]  # with `models`, the first; the others cost about as much each
    config = {**config, "model": {k: v for k, v in reference.items() if k not in ("name", "layers")},
              "layers": reference["layers"]}
    run_dir = Path("results") / config["run"]
    act = config["activations"]
    device = str(pick_device(device or act["device"]))
    with tempfile.TemporaryDirectory(prefix="neuron-embeddings-estimate-") as tmp:
        work = Path(tmp)
        model_dir = run_dir / "model"
        if not (model_dir / MANIFEST).is_file():  # not prepared yet: prepare a temporary copy, as the workflow would
            model_dir = work / "model"
            prepare_model(ModelSource.from_config(config["model"]), model_dir)
        model, tokenizer, info = load_prepared(model_dir, config["model"]["trust_remote_code"])
        n_params = sum(p.numel() for p in model.parameters())
        del model
        batch = act["batch_size"]
        keep = 4 * (16 if batch == "auto" else int(batch))
        docs, tokens, exact, sample, has_bos = count_corpus(config, tokenizer, budget_s, keep)
        if not sample:
            raise PipelineError("corpus: the sources gave no tokens")
        fits = calibrate(config, model_dir, sample, has_bos, device, work)
    return {"config": config, "model": asdict(info), "parameters": n_params, "documents": docs, "tokens": tokens,
            "tokens_exact": exact, "device": device, "calibration": fits,
            "stages": [asdict(s) for s in stages(config, asdict(info), n_params, tokens, fits)]}


def stages(config: dict[str, Any], info: dict[str, Any], n_params: int, tokens: int, fits: dict[str, Any]) -> list[Stage]:
    sel, act, corpus = config["selection"], config["activations"], config["corpus"]
    layers, shards = len(config["layers"]), corpus["n_shards"]
    gpus = max(int(act["gpus"]), 1)
    k = selection_k(sel)
    n, d, p = info["n_neurons"], info["d_model"], info["n_projections"]
    context = sel["context_before"] + sel["context_after"] + 1
    store = 2 if act["store_dtype"] == "float16" else 4
    per_shard = -(-tokens // shards)
    rows = n * k  # (neuron, example) rows per layer, at most
    one_pass = sel["mode"] == "threshold" and selection_passes(sel) == 1
    # a one-pass shard holds each neuron's candidates, more than the final cap (memory.one_pass_candidates)
    shard_rows = n * one_pass_candidates(sel["cap"], per_shard) if one_pass else rows

    def cache_bytes(x_rows: int, entries: int = rows) -> int:  # one layer's state: examples, x store, statistics
        return entries * (4 + 8 + 4 * p + 4 * context + 8) + x_rows * d * store + n * (3 * 8 + 40 * 8)

    def job_hours(fit: dict[str, float] | None) -> float:
        if not fit:
            return 0.0
        return shards * (fit["startup_s"] + per_shard * fit["s_per_token"]) / 3600 * gpus

    out = [
        Stage("prepare_model", 1, "local", disk_bytes=n_params * 4, note="fp32 safetensors; runs where the hub is"),
        Stage("tokenize_corpus", 1, "CPU", tokens, tokens * 4 + 64 * tokens // max(corpus["window_tokens"], 1)),
    ]
    if sel["mode"] == "threshold" and selection_passes(sel) == 2:
        out.append(Stage("activation_stats", shards, "GPU", tokens, shards * layers * n * (3 * 8 + 40 * 8),
                         job_hours(fits.get("stats")), "pass 1: each neuron's max"))
        out.append(Stage("merge_stats", layers, "CPU", 0, layers * n * (3 * 8 + 40 * 8)))
    out += [
        Stage("cache_activations", shards, "GPU", tokens,
              shards * layers * cache_bytes(min(shard_rows, per_shard), shard_rows),
              job_hours(fits.get("cache")), f"{gpus} GPU(s) per job; one forward pass per shard serves all layers"),
        Stage("select_examples", layers, "CPU", 0, layers * cache_bytes(min(rows, tokens))),
        Stage("embed_neurons", layers, "CPU", 0, layers * rows * (4 * p * d + 8 * p + 12 * context + 64)),
        Stage("cluster_features", layers, "CPU", 0, layers * rows * 24),
        Stage("neuron_metrics", layers, "CPU", 0, layers * n * 48),
        Stage("summarize_run + report", 2, "CPU"),
    ]
    return out


def human_bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""


def documents_text(result: dict[str, Any]) -> str:
    """The documents count as estimated: counting stops once max_tokens is reached, while the corpus stage samples
    its windows from every document, so a capped count is a lower bound."""
    cap = result["config"]["corpus"].get("max_tokens")
    if cap is not None and result["tokens"] >= cap:
        return f"at least {result['documents']} documents (counted until max_tokens was reached)"
    return f"{result['documents']} documents"


def render(result: dict[str, Any]) -> str:
    info, fits = result["model"], result["calibration"]
    lines = [
        f"model: {info['architecture']}, {info['n_layers']} layers, d_model {info['d_model']}, "
        f"{info['n_neurons']} neurons x {info['n_projections']} projection(s), {result['parameters'] / 1e6:.1f} M parameters",
        f"corpus: {documents_text(result)}, {result['tokens']:,} tokens"
        + ("" if result["tokens_exact"] else " (extrapolated: counting stopped at the time budget)"),
    ]
    for name, fit in fits.items():
        lines.append(
            f"calibration ({name} pass, {result['device']}, {fit['calibration_tokens']} tokens): "
            f"{fit['tokens_per_s']:,.0f} tokens/s, {fit['startup_s']:.1f} s start-up per job"
        )
    if result["device"] == "cpu" and int(result["config"]["activations"]["gpus"]) > 0:
        lines.append("note: calibrated on the CPU; GPU jobs will be faster (run this on a GPU node for GPU-hours)")
    lines.append("")
    lines.append(f"{'stage':<24} {'jobs':>5} {'where':<6} {'tokens':>12} {'disk (est.)':>15} {'hours':>9}")
    total_disk = total_gpu = total_cpu = 0.0
    for s in result["stages"]:
        hours = f"{s['hours']:.3f}" if s["hours"] else "-"
        lines.append(f"{s['name']:<24} {s['jobs']:>5} {s['where']:<6} {s['tokens'] or '-':>12} "
                     f"{human_bytes(s['disk_bytes']) if s['disk_bytes'] else '-':>15} {hours:>9}  {s['note']}")
        total_disk += s["disk_bytes"]
        if s["where"] == "GPU":
            total_gpu += s["hours"]
        else:
            total_cpu += s["hours"]
    lines.append(f"{'total':<24} {sum(s['jobs'] for s in result['stages']):>5} {'':<6} {'':>12} "
                 f"{human_bytes(total_disk):>15} {total_gpu:>9.3f}  GPU-hours ({result['device']} calibration)")
    lines.append("(plus the analyses and the explorer: a few small CPU jobs per layer; token importance reruns the "
                 "model on the shown examples only)")
    models = result["config"].get("models") or []
    if len(models) > 1:
        lines.append(f"(models: the table is the first of the run's {len(models)} models, "
                     f"'{models[0]['name']}'; each other model adds about as much)")
    return "\n".join(lines)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    from .checks import fill_defaults

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: cannot read the config ({exc})") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: not a YAML mapping")
    try:
        return fill_defaults(config, SCHEMA)
    except PipelineError as exc:
        raise PipelineError(f"{Path(path).name}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", default="config.yaml", help="the run's config (default: config.yaml)")
    parser.add_argument("--device", help="calibrate on this device instead of activations.device")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds to spend counting the corpus")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def main(args: argparse.Namespace) -> int:
    result = estimate(load_config(args.configfile), args.device, args.budget)
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))
    return 0
