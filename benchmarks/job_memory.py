"""Peak memory of the embedding job, the whole-model way against the one-layer way, measured in one run; and the
memory estimate every rule declares (mem_mb), for the demo model and for 1B- and 8B-class Llama shapes.

    python benchmarks/job_memory.py --run results/smollm2-demo [--layer 10]

Each variant runs the real embedding stage (embeddings.build_embeddings) on the run's selection of that layer, in
a fresh process, and reports that process's peak RSS:
- before: the layer's input weights taken from the whole model loaded in float32 (what the stage did before);
- after: the layer's tensors read by name from the prepared safetensors (models.layer_input_weights).
Both write the same file; the script checks that they are equal.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from neuron_embeddings import memory


def weights_child(run: Path, layer: int, way: str) -> None:
    """Only what the two ways differ in: getting the layer's input weights."""
    from neuron_embeddings import models
    from neuron_embeddings.adapters import adapter_for

    if way == "before":
        model, _, _ = models.load_prepared(run / "model")
        adapter_for(model).input_weights(model, layer)
    else:
        models.layer_input_weights(run / "model", layer)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def child(run: Path, layer: int, way: str, out: Path) -> None:
    from neuron_embeddings import embeddings, models

    if way == "before":
        def whole_model(model_dir, layer, trust_remote_code=False):
            from neuron_embeddings.adapters import adapter_for

            model, _, _ = models.load_prepared(model_dir, trust_remote_code)
            return adapter_for(model).input_weights(model, layer)

        embeddings.layer_input_weights = whole_model
    shards = sorted(str(p) for p in (run / "corpus").glob("shard-*.parquet"))
    embeddings.build_embeddings(run / f"selection/layer-{layer}.safetensors", run / "model", shards, out, layer)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


LLAMA_SHAPES = {
    # n_layers, d_model, n_neurons (F), vocab, parameters
    "Llama-3.2-1B": memory.Shape(16, 2048, 8192, 2, 1_235_814_400, 128_256),
    "Llama-3.1-8B": memory.Shape(32, 4096, 14_336, 2, 8_030_261_248, 128_256),
}


def estimates(shape: memory.Shape, layers: int, examples: int, window: int, batch: int, shard: int) -> dict[str, int]:
    deepest = shape.n_layers - 1
    return {
        "prepare_model (whole model, float32)": memory.whole_model_mb(shape),
        f"caching ({layers} layers, deepest {deepest}, {examples} examples, {shard:,} tokens a shard)": memory.caching_mb(
            shape, deepest_layer=deepest, cached_layers=layers, examples=examples, batch_tokens=batch * window,
            shard_tokens=shard),
        "caching, layers 0-3 (deepest 3)": memory.caching_mb(
            shape, deepest_layer=3, cached_layers=layers, examples=examples, batch_tokens=batch * window,
            shard_tokens=shard),
        "caching, GPU memory (bfloat16)": memory.gpu_mb(shape, deepest, "bfloat16", batch * window, layers),
        f"embeddings (one layer, {examples} examples)": memory.embedding_mb(shape, examples),
        "embeddings if it loaded the whole model (before)": memory.whole_model_mb(shape) // 2
        + memory.embedding_mb(shape, examples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("results/smollm2-demo"))
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--child", choices=["before", "after"])
    parser.add_argument("--weights-only", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        if args.weights_only:
            weights_child(args.run, args.layer, args.child)
        else:
            child(args.run, args.layer, args.child, args.out)
        return
    layer = args.layer if args.layer is not None else min(
        int(p.stem.split("-")[1]) for p in (args.run / "selection").glob("layer-*.safetensors"))
    peaks, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("before", "after"):
            out = Path(tmp) / f"{way}.parquet"
            proc = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--layer", str(layer),
                                   "--child", way, "--out", str(out)], capture_output=True, text=True, check=True)
            peaks[way] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kib"] / 1024
            tables[way] = pq.read_table(out)
        weights = {}
        for way in ("before", "after"):
            proc = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--layer", str(layer),
                                   "--child", way, "--weights-only"], capture_output=True, text=True, check=True)
            weights[way] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kib"] / 1024
    assert tables["before"].equals(tables["after"]), "the two ways wrote different embeddings"
    manifest = json.loads((args.run / "model/neuron_embeddings.json").read_text())
    print(f"embedding job, layer {layer} of {args.run} ({manifest['architecture']}, {manifest['parameters'] / 1e6:.0f} M "
          f"parameters, {tables['after'].num_rows} rows):")
    print(f"  before (whole model in float32): peak RSS {peaks['before']:8.0f} MiB")
    print(f"  after  (one layer by name):      peak RSS {peaks['after']:8.0f} MiB   ({peaks['after'] / peaks['before']:.2f}x)")
    print(f"  getting the layer's weights alone: {weights['before']:.0f} MiB before, {weights['after']:.0f} MiB after "
          f"(a process that imports torch and transformers and does nothing else: see RUNTIME_MB)")
    shape = memory.model_shape(args.run / "model", None)
    print(f"  declared mem_mb for this job: {memory.embedding_mb(shape, 40)} (estimate, 40 examples per neuron)")
    print()
    print("declared memory (mem_mb, MiB) for Llama-shaped models, paper's selection (cap 200), 4 cached layers, "
          "float32 x store, batches of 16 x 128 tokens:")
    for name, llama in LLAMA_SHAPES.items():
        print(f"  {name}:")
        for what, mb in estimates(llama, 4, 200, 128, 16, 1_000_000).items():
            print(f"    {what:72s} {mb:>8,d}")


if __name__ == "__main__":
    main()
