"""The paper's original toolchain as a baseline: TransformerLens run_with_cache plus a running top-k.

Runs inside benchmarks/.venv-tl (see setup-transformer-lens.sh); prints one JSON line with tokens/second.
The model is GPT-2-small-shaped with random weights, so nothing is downloaded.
"""

import argparse
import json
import statistics
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--window", type=int, default=64)
parser.add_argument("--batches", type=int, default=4)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--top-k", type=int, default=20)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
cfg = HookedTransformerConfig(
    n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
    act_fn="gelu_new", normalization_type="LN", device="cpu",
)
model = HookedTransformer(cfg).eval()
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 50257, (args.batch_size, args.window), generator=g) for _ in range(args.batches)]
names = [f"blocks.{layer}.mlp.hook_post" for layer in range(12)] + [f"blocks.{layer}.ln2.hook_normalized" for layer in range(12)]


def run(ids, state):
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)
    for layer in range(12):
        acts = cache[f"blocks.{layer}.mlp.hook_post"].reshape(-1, 3072)
        values, index = torch.topk(acts, args.top_k, dim=0)
        if layer in state:
            values = torch.cat([state[layer][0], values])
            index = torch.cat([state[layer][1], index])
            values, pick = torch.topk(values, args.top_k, dim=0)
            index = torch.gather(index, 0, pick)
        state[layer] = (values, index)


with torch.inference_mode():
    run(batches[0], {})
    rates = []
    for _ in range(args.repeats):
        state = {}
        start = time.perf_counter()
        for ids in batches:
            run(ids, state)
        rates.append(sum(ids.numel() for ids in batches) / (time.perf_counter() - start))
print(json.dumps({"transformer_lens_tokens_per_s": statistics.median(rates)}))
