from neuron_embeddings.runner import run_stage
from neuron_embeddings.sweep import plot_layer, summary_table

layers = list(snakemake.params.layers)
inputs = snakemake.input


def main():
    for i, layer in enumerate(layers):
        plot_layer(inputs.metrics[i], inputs.sweep[i], inputs.similar[i], snakemake.output.figures[i], layer)
    return summary_table(
        inputs.summary,
        dict(zip(layers, inputs.metrics)),
        dict(zip(layers, inputs.sweep)),
        dict(zip(layers, inputs.similar)),
        dict(zip(layers, inputs.importance)),
        snakemake.output.table,
    )


run_stage("analysis_figures", main, snakemake.log[0])
