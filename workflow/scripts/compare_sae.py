from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae import compare_units

name = snakemake.wildcards.sae
run_stage(
    f"compare_sae {name}",
    lambda: compare_units(
        snakemake.input.neurons,
        snakemake.input.latents,
        snakemake.input.quality,
        snakemake.output.json,
        snakemake.output.png,
        name,
        snakemake.params.layer,
        n_boot=snakemake.params.bootstrap,
    ),
    snakemake.log[0],
)
