from neuron_embeddings.clustering import cluster_layer
from neuron_embeddings.runner import run_stage

# Also the SAE latents' clustering (sae.smk: use rule cluster_features as cluster_sae_latents).
layer = snakemake.params.layer
run_stage(
    f"{snakemake.rule} layer {layer}",
    lambda: cluster_layer(
        snakemake.input.embeddings, snakemake.output.clusters, layer, snakemake.params.threshold, snakemake.params.method,
        selection_path=snakemake.input.selection, weights_path=snakemake.input.embedding_weights,
    ),
    snakemake.log[0],
)
