from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.comparison import compare_units
from neuron_embeddings.sae.plots import plot_comparison

name, layer = snakemake.wildcards.sae, snakemake.params.layer


def compare():
    summary = compare_units(
        snakemake.input.neurons,
        snakemake.input.latents,
        snakemake.input.quality,
        snakemake.output.json,
        name,
        layer,
        n_boot=snakemake.params.bootstrap,
    )
    plot_comparison(snakemake.input.neurons, snakemake.input.latents, snakemake.output.png, name, layer)
    return summary


run_stage(f"compare_sae {name}", compare, snakemake.log[0])
