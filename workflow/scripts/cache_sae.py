from pathlib import Path

from neuron_embeddings.activations import CacheSettings
from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae import cache_sae_shard

names = list(snakemake.params.saes)
folders = [Path(path).parent for path in snakemake.input.saes[::2]]  # (cfg.json, weights) per SAE, in name order
settings = {**snakemake.params.selection, **snakemake.params.compute}
run_stage(
    f"{snakemake.rule} shard {snakemake.wildcards.shard}",
    lambda: cache_sae_shard(
        snakemake.input.model,
        snakemake.input.shard,
        saes={name: (snakemake.params.saes[name], folder) for name, folder in zip(names, folders)},
        out_paths=dict(zip(names, snakemake.output)),
        settings=CacheSettings(top_k=settings.pop("top_k", 1), window_tokens=snakemake.params.window_tokens, **settings),
        shard=snakemake.wildcards.shard,
        trust_remote_code=snakemake.params.trust_remote_code,
        stats_paths=dict(zip(names, snakemake.input.stats)) if snakemake.input.get("stats") else None,
        stats_only=snakemake.params.stats_only,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
