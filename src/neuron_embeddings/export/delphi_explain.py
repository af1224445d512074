"""Run delphi's explainer and scorers on an exported layer (a GPU machine with delphi installed: pip install
eai-delphi). delphi's own command line (`python -m delphi`) always loads a model and its sparse coders to fill the
cache first; here the cache is already written, so this calls delphi's `process_cache` on it directly, with the
explainer, scorers and samplers of delphi's RunConfig:

    python -m neuron_embeddings.export.delphi_explain results/<run>/export/delphi/layer-2 \\
        --tokenizer results/<run>/model --latents clusters --explainer-model <hub id or path> --num-gpus 2

Explanations land in <layer folder>/delphi/explanations/, scores in <layer folder>/delphi/scores/<scorer>/, one
file per latent (`layers.2.mlp.clusters_latent17.txt`; cluster_latents.parquet maps 17 to its neuron and cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .delphi import hookpoints


def build_run_config(args: argparse.Namespace, layer: int) -> Any:
    from delphi.config import CacheConfig, ConstructorConfig, RunConfig, SamplerConfig

    kinds = ["neurons", "clusters"] if args.latents == "both" else [args.latents]
    return RunConfig(
        cache_cfg=CacheConfig(),
        constructor_cfg=ConstructorConfig(example_ctx_len=args.example_ctx_len, min_examples=args.min_examples,
                                          n_non_activating=args.n_non_activating),
        sampler_cfg=SamplerConfig(n_examples_train=args.n_examples_train, n_examples_test=args.n_examples_test,
                                  n_quantiles=args.n_quantiles, train_type="top"),
        hookpoints=[hookpoints(layer)[kind] for kind in kinds],
        explainer_model=args.explainer_model,
        explainer_provider=args.explainer_provider,
        scorers=args.scorers,
        num_gpus=args.num_gpus,
        max_latents=args.max_latents,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m neuron_embeddings.export.delphi_explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layer_dir", help="results/<run>/export/delphi/layer-<L>")
    parser.add_argument("--tokenizer", required=True, help="the run's prepared model folder (results/<run>/model) or hub id")
    parser.add_argument("--latents", choices=["clusters", "neurons", "both"], default="clusters")
    parser.add_argument("--explainer-model", default="hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4")
    parser.add_argument("--explainer-provider", choices=["offline", "openrouter"], default="offline",
                        help="offline: vLLM on this machine's GPUs; openrouter: needs OPENROUTER_API_KEY")
    parser.add_argument("--scorers", nargs="+", default=["detection", "fuzz"])
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--example-ctx-len", type=int, default=16, help="must divide the run's window_tokens")
    parser.add_argument("--min-examples", type=int, default=10, help="fewer activating windows: the latent is skipped")
    parser.add_argument("--n-non-activating", type=int, default=20)
    parser.add_argument("--n-examples-train", type=int, default=20)
    parser.add_argument("--n-examples-test", type=int, default=20)
    parser.add_argument("--n-quantiles", type=int, default=5)
    parser.add_argument("--max-latents", type=int, help="only latents 0..N-1 of each hookpoint")
    parser.add_argument("--out", help="default <layer_dir>/delphi")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from delphi.__main__ import process_cache
    from transformers import AutoTokenizer

    layer_dir = Path(args.layer_dir)
    layer = int(layer_dir.name.rsplit("-", 1)[1])
    run_cfg = build_run_config(args, layer)
    out = Path(args.out) if args.out else layer_dir / "delphi"
    latent_range = torch.arange(args.max_latents) if args.max_latents else None
    asyncio.run(process_cache(run_cfg, layer_dir / "latents", out / "explanations", out / "scores",
                              run_cfg.hookpoints, AutoTokenizer.from_pretrained(args.tokenizer), latent_range))
    return 0


if __name__ == "__main__":
    sys.exit(main())
