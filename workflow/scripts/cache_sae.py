# Both passes over the SAEs' latents: sae_activation_stats (stats_only) and cache_sae (use rule of it).
from pathlib import Path

from neuron_embeddings.activations import CacheSettings
from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.latents import cache_sae_shard

names = list(snakemake.params.saes)  # every input and output list below is in this order, one entry per SAE
folders = [Path(path).parent for path in snakemake.input.cfgs]
selection = dict(snakemake.params.selection)
# top_k mode keeps top_k examples; threshold mode keeps none that way (its cap and quantiles decide).
top_k = selection.pop("top_k") if selection["mode"] == "top_k" else 0
run_stage(
    f"{snakemake.rule} shard {snakemake.wildcards.shard}",
    lambda: cache_sae_shard(
        snakemake.input.model,
        snakemake.input.shard,
        saes={name: (snakemake.params.saes[name], folder) for name, folder in zip(names, folders)},
        out_paths=dict(zip(names, snakemake.output.per_sae)),
        settings=CacheSettings(top_k=top_k, window_tokens=snakemake.params.window_tokens, **selection,
                               **snakemake.params.compute),
        shard=snakemake.wildcards.shard,
        trust_remote_code=snakemake.params.trust_remote_code,
        stats_only=snakemake.params.stats_only,
        stats_paths=dict(zip(names, snakemake.input.stats)) if snakemake.input.stats else None,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
