"""Caching throughput and memory, measured side by side in one run.

    python benchmarks/caching_throughput.py --shape gpt2-small --dtype float32 [--selection threshold]
        [--transformer-lens] [--memory]

Models are built from a config with random weights (nothing is downloaded): gpt2-small (12 x 3072 neurons,
d_model 768), smollm2-135m (30 x 1536, gated), llama-1b (16 x 8192, gated, for a GPU), or --model with a
folder written by the prepare_model stage. It prints tokens/second (medians over interleaved repeats) of:
- the bare transformer body (no LM head, no hooks) at the chosen precision,
- the caching path the pipeline runs (hooks + exact running top-k + statistics for every cached layer), or with
  --selection threshold the paper's selection (every example >= alpha x max, capped by a seeded sample) in the
  default one exact pass, and in the two-pass reference (pass 1: statistics; pass 2: the sample) with what both
  cost per corpus token,
- with --transformer-lens, TransformerLens 3.x run_with_cache + a running top-k on GPT-2-small (the paper's
  toolchain; its own environment from benchmarks/setup-transformer-lens.sh), always fp32 on the CPU;
and the ratios, the storage of the cached MLP inputs, and with --memory the peak RSS of a caching process over
1x and 10x the tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from neuron_embeddings.adapters import MLPCapture, adapter_for, run_capture
from neuron_embeddings.models import DTYPES, describe, load_prepared, ModelSource
from neuron_embeddings.activations import StatsOnly
from neuron_embeddings.topk import OnePassAccumulator, ThresholdAccumulator, TopKAccumulator

HERE = Path(__file__).resolve().parent


def build(shape: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    configs = {
        "gpt2-small": lambda: GPT2Config(),
        "smollm2-135m": lambda: LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
        "llama-1b": lambda: LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    }
    model = AutoModelForCausalLM.from_config(configs[shape]()).eval()
    return model, describe(model, ModelSource(source=f"random-init {shape}"))


def load(args):
    if args.model:
        model, _, info = load_prepared(args.model)
        return model, info
    return build(args.shape)


def parse_layers(text: str, info) -> list[int]:
    return list(range(info.n_layers)) if text == "all" else [int(v) for v in text.split(",")]


def make_batches(vocab: int, args, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (args.batch_size, args.window), generator=g) for _ in range(args.batches)]


def accumulators(info, layers, args, kind: str, max_activation: dict | None = None) -> dict:
    """What a caching job feeds per layer: top_k mode's accumulator, or the threshold mode's two passes."""
    if kind == "top_k":
        return {layer: TopKAccumulator(info.n_neurons, info.d_model, info.n_projections, args.top_k, 20, 10,
                                       x_dtype=DTYPES[args.store_dtype]) for layer in layers}
    if kind == "stats":
        return {layer: StatsOnly(info.n_neurons, 8) for layer in layers}
    if kind == "one_pass":
        return {layer: OnePassAccumulator(info.n_neurons, info.d_model, info.n_projections, args.alpha, args.cap, 20, 10,
                                          x_dtype=DTYPES[args.store_dtype]) for layer in layers}
    return {layer: ThresholdAccumulator(max_activation[layer], info.d_model, info.n_projections, args.alpha,
                                        args.cap, 20, 10, x_dtype=DTYPES[args.store_dtype]) for layer in layers}


def selects(accs: dict) -> bool:
    """Whether these accumulators keep examples (pass 1's statistics-only ones do not)."""
    return hasattr(next(iter(accs.values())), "examples")


def caching_step(model, info, layers, args, accs: dict):
    adapter = adapter_for(model)
    body = adapter.body(model)
    counter = iter(range(10**12))
    valid = torch.ones(args.batch_size, args.window, dtype=torch.bool)
    valid[:, 0] = False
    positions = torch.arange(args.window)

    def step(ids):
        # Hooks registered around each timed run only, so the bare body runs without them.
        cap = MLPCapture(model, adapter, layers, stop_after_last=True)
        try:
            run_capture(body, ids)
            base = next(counter) * ids.shape[0]
            token_index = (base + torch.arange(ids.shape[0]))[:, None] * args.window + positions[None, :]
            for layer, acc in accs.items():
                slot = cap.captured[layer]
                acc.update(slot["act"], slot["pre"], slot["x"], valid, token_index)
        finally:
            cap.remove()

    return step


def saturate(examples) -> None:
    """A kept set as a long run leaves it: nothing new gets in. The top-k and two-pass sets with every key +inf;
    the one-pass candidates with `cap` entries per neuron that rank first and score highest (so every new entry
    has cap dominators)."""
    if hasattr(examples, "cap") and examples.keys.shape[1] < examples.cap:
        examples._widen(examples.cap)
    examples.keys.fill_(float("inf"))
    if hasattr(examples, "cap"):
        examples.values.fill_(torch.finfo(torch.float32).max)
        examples.tokens.copy_(torch.arange(examples.tokens.shape[1]).expand_as(examples.tokens))
        examples.count.fill_(examples.tokens.shape[1])
        examples._refresh_table(torch.arange(examples.count.numel()))


def changed(tokens: torch.Tensor, before: torch.Tensor) -> int:
    """Kept entries that changed (the one-pass candidates may have widened meanwhile)."""
    width = min(tokens.shape[1], before.shape[1])
    wider = abs(tokens.shape[1] - before.shape[1]) * tokens.shape[0]
    return int((tokens[:, :width] != before[:, :width]).sum()) + wider


def rate(fn, batches) -> float:
    if batches[0].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for ids in batches:
        fn(ids)
    if batches[0].device.type == "cuda":
        torch.cuda.synchronize()
    return sum(ids.numel() for ids in batches) / (time.perf_counter() - start)


def memory_child(args) -> None:
    """Stream --tokens tokens through the caching path; print the peak RSS (KiB)."""
    model, info = load(args)
    model.to(DTYPES[args.dtype])
    layers = parse_layers(args.layers, info)
    accs = accumulators(info, layers, args, "top_k")
    step = caching_step(model, info, layers, args, accs)
    g = torch.Generator().manual_seed(1)
    n_batches = max(1, args.tokens // (args.batch_size * args.window))
    with torch.inference_mode():
        for _ in range(n_batches):
            step(torch.randint(0, model.config.vocab_size, (args.batch_size, args.window), generator=g))
    rows = sum(acc.examples.x_store.shape[0] for acc in accs.values())
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "batches": n_batches,
                      "x_rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2-small", choices=["gpt2-small", "smollm2-135m", "llama-1b"])
    parser.add_argument("--model", help="a prepared model folder instead of a random-init shape")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                        help="precision of the kept MLP inputs x (activations.store_dtype)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    parser.add_argument("--selection", default="top_k", choices=["top_k", "threshold"],
                        help="top_k: one pass; threshold: the paper's, in one pass and in two, against the bare body")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--cap", type=int, default=200)
    parser.add_argument("--warmup-batches", type=int, default=12,
                        help="batches fed to the running top-k before timing: a real run spends nearly all its "
                             "tokens in this steady state, where few tokens still enter a neuron's top k")
    parser.add_argument("--transformer-lens", action="store_true", help="also time the TransformerLens baseline")
    parser.add_argument("--memory", action="store_true", help="peak RSS over 1x and 10x --tokens")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, info = load(args)
    model.to(device=device, dtype=DTYPES[args.dtype])
    layers = parse_layers(args.layers, info)
    body = adapter_for(model).body(model)
    batches = [b.to(device) for b in make_batches(model.config.vocab_size, args)]
    warm = [b.to(device) for b in make_batches(
        model.config.vocab_size, argparse.Namespace(**{**vars(args), "batches": args.warmup_batches}), seed=1)]
    paths: dict[str, tuple] = {}  # label -> (step, accumulators)
    with torch.inference_mode():
        rate(lambda ids: body(input_ids=ids, use_cache=False), batches[:1])
        if args.selection == "top_k":
            accs = accumulators(info, layers, args, "top_k")
            paths["caching path (top_k)"] = (caching_step(model, info, layers, args, accs), accs)
        else:
            accs = accumulators(info, layers, args, "one_pass")
            paths["threshold in one pass (default)"] = (caching_step(model, info, layers, args, accs), accs)
            stats = accumulators(info, layers, args, "stats")
            paths["pass 1: statistics"] = (caching_step(model, info, layers, args, stats), stats)
            # The maxima pass 1 would measure over the whole corpus: here, over every batch the benchmark uses.
            rate(paths["pass 1: statistics"][0], warm + batches)
            maxima = {layer: acc.state()["stat_max"] for layer, acc in stats.items()}
            second = accumulators(info, layers, args, "threshold", maxima)
            paths["pass 2: selection"] = (caching_step(model, info, layers, args, second), second)
        for step, _ in paths.values():
            rate(step, warm)  # towards the steady state a real run spends nearly all its tokens in
        # The limit of a long run, where almost no token still enters a selection: the same paths with every
        # kept set full of +inf keys, so what remains is the fixed cost per token (hooks, statistics, the test).
        for label in [label for label, (_, a) in paths.items() if selects(a)]:
            limit = {layer: copy.deepcopy(acc) for layer, acc in paths[label][1].items()}
            for acc in limit.values():
                saturate(acc.examples)
            paths[f"{label}, long-run limit"] = (caching_step(model, info, layers, args, limit), limit)
        kept_before = {label: [acc.examples.tokens.clone() for acc in a.values()]
                       for label, (_, a) in paths.items() if selects(a)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        bare_rates, path_rates = [], {label: [] for label in paths}
        for _ in range(args.repeats):  # interleaved, so a busy machine slows every path alike
            bare_rates.append(rate(lambda ids: body(input_ids=ids, use_cache=False), batches))
            for label, (step, _) in paths.items():
                path_rates[label].append(rate(step, batches))
    bare = statistics.median(bare_rates)
    rates = {label: statistics.median(r) for label, r in path_rates.items()}
    n_timed = len(layers) * len(batches) * args.repeats
    replaced = {label: sum(changed(acc.examples.tokens, before) for acc, before in zip(paths[label][1].values(), kept))
                / n_timed for label, kept in kept_before.items()}
    seen = (args.warmup_batches + len(batches) * (args.repeats + 1)) * args.batch_size * args.window
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    selection = f"top-{args.top_k}" if args.selection == "top_k" else f"threshold {args.alpha} x max, cap {args.cap}"
    print(f"model: {info.architecture} {args.model or args.shape} ({info.n_layers} layers x {info.n_neurons} neurons, "
          f"d_model {info.d_model}); caching {len(layers)} layers, {selection}; {args.dtype} on {where}; "
          f"batches of {args.batch_size} x {args.window} tokens")
    print(f"{'bare body forward':42s}{bare:8.0f} tokens/s")
    for label, value in rates.items():
        note = f"   ({replaced[label]:.0f} kept entries replaced per layer and batch, ~{seen} tokens in)" if label in replaced else ""
        print(f"{label:42s}{value:8.0f} tokens/s {value / bare:5.2f} x bare body{note}")
    measured = {label: value for label, value in rates.items() if not label.endswith("long-run limit")}
    passes = {label: value for label, value in measured.items() if label.startswith("pass ")}
    if passes:  # both passes read every token: the corpus costs the sum of their times
        both = 1 / sum(1 / value for value in passes.values())
        print(f"{'both passes, per corpus token':42s}{both:8.0f} tokens/s {both / bare:5.2f} x bare body")
    print("target: >= 0.90 x bare body per pass; the paper's selection >= 0.85 x per corpus token")
    cached = min(measured.values())
    if device.type == "cuda":
        print(f"peak GPU memory                   {torch.cuda.max_memory_allocated(device) / 2**30:10.2f} GiB")
    if args.transformer_lens:
        python = HERE / ".venv-tl" / "bin" / "python"
        if not python.exists():
            print("TransformerLens baseline: run benchmarks/setup-transformer-lens.sh first")
        else:
            out = subprocess.run([str(python), str(HERE / "tl_baseline.py"), "--batch-size", str(args.batch_size),
                                  "--window", str(args.window), "--batches", str(args.batches),
                                  "--repeats", str(args.repeats), "--top-k", str(args.top_k),
                                  "--threads", str(torch.get_num_threads())],
                                 capture_output=True, text=True, check=True)
            tl = json.loads(out.stdout.strip().splitlines()[-1])["transformer_lens_tokens_per_s"]
            print(f"TransformerLens 3.x run_with_cache + top-k (GPT-2-small, fp32, CPU) {tl:10.0f} tokens/s")
            print(f"slowest caching pass / TransformerLens {cached / tl:5.2f}   (target >= 4)")
    n_tokens = sum(b.numel() for b in batches) * args.repeats + args.warmup_batches * args.batch_size * args.window
    rows = sum(acc.examples.state()["x"].shape[0] for acc in accs.values()) / len(accs)
    kept = sum(int((acc.examples.state()["xrow"] >= 0).sum()) for acc in accs.values()) / len(accs)
    print(f"x store per layer: {rows:.0f} distinct tokens for {kept:.0f} kept examples after {n_tokens} tokens "
          f"= {rows * info.d_model * 4 / 2**20:.1f} MiB fp32, {rows * info.d_model * 2 / 2**20:.1f} MiB fp16 "
          f"(vs {kept * info.d_model * 4 / 2**20:.1f} MiB with one fp32 vector per example)")
    if args.memory:
        peaks, rows = [], []
        for scale in (1, 10):
            cmd = [sys.executable, __file__, "--memory-child", "--shape", args.shape, "--dtype", args.dtype,
                   "--store-dtype", args.store_dtype, "--layers", args.layers,
                   "--batch-size", str(args.batch_size), "--window", str(args.window), "--top-k", str(args.top_k),
                   "--tokens", str(args.tokens * scale)] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.append(child["maxrss_kib"])
            rows.append(child["x_rows"])
        # Live rows: at most one per kept entry; the buffer adds half again plus one batch (topk.ExampleSet).
        bound = len(layers) * 3 * (info.n_neurons * args.top_k + args.batch_size * args.window) // 2
        print(f"peak RSS caching {len(layers)} layers, {args.tokens} tokens: {peaks[0] / 1024:.0f} MiB "
              f"({rows[0]} x rows held); {10 * args.tokens} tokens: {peaks[1] / 1024:.0f} MiB ({rows[1]} x rows); "
              f"ratio {peaks[1] / peaks[0]:.3f}   (target <= 1.1; the x store never holds more than {bound} rows, "
              f"{bound * info.d_model * (2 if args.store_dtype == 'float16' else 4) / 2**20:.0f} MiB, whatever the corpus)")


if __name__ == "__main__":
    main()
