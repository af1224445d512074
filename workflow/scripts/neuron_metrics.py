from neuron_embeddings.metrics import layer_metrics
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"neuron_metrics layer {layer}",
    lambda: layer_metrics(
        snakemake.input.embeddings, snakemake.input.clusters, snakemake.input.selection, snakemake.output[0], layer,
        **snakemake.params.settings,
    ),
    snakemake.log[0],
)
