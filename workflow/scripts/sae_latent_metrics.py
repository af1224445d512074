from neuron_embeddings.metrics import layer_metrics
from neuron_embeddings.runner import run_stage

run_stage(
    f"sae_latent_metrics {snakemake.wildcards.sae}",
    lambda: layer_metrics(
        snakemake.input.embeddings, snakemake.input.clusters, snakemake.input.selection, snakemake.output[0],
        snakemake.params.layer, **snakemake.params.settings,
    ),
    snakemake.log[0],
)
