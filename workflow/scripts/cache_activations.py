from neuron_embeddings.activations import CacheSettings, cache_shard
from neuron_embeddings.runner import run_stage

sel, act = snakemake.params.selection, snakemake.params.activations
settings = CacheSettings(
    top_k=sel["top_k"],
    context_before=sel.get("context_before", 20),
    context_after=sel.get("context_after", 10),
    window_tokens=snakemake.params.window_tokens,
    batch_size=act.get("batch_size", 16),
    device=act.get("device", "auto"),
    dtype=act.get("dtype", "float32"),
)
layers = list(snakemake.params.layers)
run_stage(
    f"cache_activations shard {snakemake.wildcards.shard}",
    lambda: cache_shard(
        snakemake.input.model,
        snakemake.input.shard,
        layers,
        dict(zip(layers, snakemake.output)),
        settings,
        shard=snakemake.wildcards.shard,
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
