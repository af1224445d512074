from neuron_embeddings.runner import run_stage
from neuron_embeddings.sweep import threshold_sweep

layer = int(snakemake.wildcards.layer)
run_stage(
    f"threshold_sweep layer {layer}",
    lambda: threshold_sweep(snakemake.input.embeddings, snakemake.output.sweep, layer, list(snakemake.params.thresholds),
                            snakemake.params.method, selection_path=snakemake.input.selection,
                            weights_path=snakemake.input.embedding_weights),
    snakemake.log[0],
)
