from neuron_embeddings.clustering import cluster_layer
from neuron_embeddings.runner import run_stage

run_stage(
    f"cluster_sae_latents {snakemake.wildcards.sae}",
    lambda: cluster_layer(
        snakemake.input[0], snakemake.output[0], snakemake.params.layer, snakemake.params.threshold, snakemake.params.method
    ),
    snakemake.log[0],
)
