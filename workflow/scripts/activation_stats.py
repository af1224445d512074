from neuron_embeddings.activations import CacheSettings, stats_shard
from neuron_embeddings.runner import run_stage

settings = CacheSettings(
    top_k=0, context_before=0, context_after=0, window_tokens=snakemake.params.window_tokens,
    **snakemake.params.compute,
)
layers = list(snakemake.params.layers)
run_stage(
    f"activation_stats shard {snakemake.wildcards.shard}",
    lambda: stats_shard(
        snakemake.input.model,
        snakemake.input.shard,
        layers,
        {layer: f"{snakemake.output.stats}/layer-{layer}.safetensors" for layer in layers},
        settings,
        shard=snakemake.wildcards.shard,
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
