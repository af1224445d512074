from neuron_embeddings.clustering import cluster_layer
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"cluster_features layer {layer}",
    lambda: cluster_layer(snakemake.input[0], snakemake.output[0], layer, snakemake.params.threshold, snakemake.params.method),
    snakemake.log[0],
)
