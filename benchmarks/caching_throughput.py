"""Caching throughput against a bare forward pass of the same model, measured side by side in one process.

    python benchmarks/caching_throughput.py [--model results/smollm2-demo/model] [--layers 2 10 18 27]

Prints tokens/second (median of --repeats) for: the whole model `model(ids)` (logits included), the bare body
up to the deepest requested layer, and the caching path (hooks + running top-k for every requested layer);
then the ratios. Run `make demo` first, or pass any folder written by the prepare_model stage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuron_embeddings.adapters import MLPCapture, adapter_for, run_capture
from neuron_embeddings.models import load_prepared
from neuron_embeddings.topk import TopKAccumulator


def timed(fn, batches, repeats) -> float:
    fn(batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for ids in batches:
            fn(ids)
        rates.append(sum(ids.numel() for ids in batches) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/smollm2-demo/model")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 27])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()

    model, _, info = load_prepared(args.model)
    adapter = adapter_for(model)
    body = adapter.body(model)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.window), generator=generator) for _ in range(args.batches)]
    valid = torch.ones(args.batch_size, args.window, dtype=torch.bool)
    positions = torch.arange(args.window)

    with torch.inference_mode():
        full = timed(lambda ids: model(input_ids=ids), batches, args.repeats)
        with MLPCapture(model, adapter, [max(args.layers)], stop_after_last=True):
            truncated = timed(lambda ids: run_capture(body, ids), batches, args.repeats)
        accs = {layer: TopKAccumulator(info.n_neurons, info.d_model, info.n_projections, args.top_k, 20, 10) for layer in args.layers}
        counter = iter(range(10**9))
        with MLPCapture(model, adapter, args.layers, stop_after_last=True) as capture:
            def cache(ids):
                run_capture(body, ids)
                base = next(counter) * args.batch_size
                token_index = (base + torch.arange(ids.shape[0]))[:, None] * args.window + positions[None, :]
                for layer, acc in accs.items():
                    slot = capture.captured[layer]
                    acc.update(slot["act"], slot["pre"], slot["x"], valid, token_index)
            caching = timed(cache, batches, args.repeats)

    print(f"model {info.architecture} ({info.n_layers} layers), layers {args.layers}, batch {args.batch_size}x{args.window}, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"whole model forward (logits)      {full:10.0f} tokens/s")
    print(f"body up to layer {max(args.layers):<3d} (bare)       {truncated:10.0f} tokens/s")
    print(f"caching ({len(args.layers)} layers, top-{args.top_k})      {caching:10.0f} tokens/s")
    print(f"caching / bare body to same layer {caching / truncated:10.2f}")
    print(f"caching / whole model forward     {caching / full:10.2f}")


if __name__ == "__main__":
    main()
