from neuron_embeddings.activations import CacheSettings, cache_shard
from neuron_embeddings.runner import run_stage

sel, compute = snakemake.params.selection, snakemake.params.compute
settings = CacheSettings(
    top_k=sel.get("top_k", 0),
    window_tokens=snakemake.params.window_tokens,
    **{k: v for k, v in sel.items() if k != "top_k"},
    **compute,
)
layers = list(snakemake.params.layers)
stats = dict(zip(layers, snakemake.input.stats)) if snakemake.input.stats else None
run_stage(
    f"cache_activations shard {snakemake.wildcards.shard}",
    lambda: cache_shard(
        snakemake.input.model,
        snakemake.input.shard,
        layers,
        {layer: f"{snakemake.output.caches}/layer-{layer}.safetensors" for layer in layers},
        settings,
        shard=snakemake.wildcards.shard,
        trust_remote_code=snakemake.params.trust_remote_code,
        stats_paths=stats,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
