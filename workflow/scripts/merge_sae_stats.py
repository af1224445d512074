from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer_stats

run_stage(
    f"merge_sae_stats {snakemake.wildcards.sae}",
    lambda: merge_layer_stats(list(snakemake.input.shards), snakemake.output.stats, snakemake.params.layer),
    snakemake.log[0],
)
