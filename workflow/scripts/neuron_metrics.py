from neuron_embeddings.metrics import layer_metrics
from neuron_embeddings.runner import run_stage

# Also the SAE latents' metrics (sae.smk: use rule neuron_metrics as sae_latent_metrics).
layer = snakemake.params.layer
run_stage(
    f"{snakemake.rule} layer {layer}",
    lambda: layer_metrics(
        snakemake.input.embeddings, snakemake.input.clusters, snakemake.input.selection, snakemake.output.metrics, layer,
        **snakemake.params.settings, weights_path=snakemake.input.embedding_weights,
    ),
    snakemake.log[0],
)
