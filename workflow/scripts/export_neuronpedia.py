from neuron_embeddings.export.neuronpedia import export_neuronpedia_layer
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"export_neuronpedia layer {layer}",
    lambda: export_neuronpedia_layer(
        snakemake.input.embeddings, snakemake.input.clusters, snakemake.input.metrics, list(snakemake.input.corpus),
        snakemake.output.neuronpedia, layer, snakemake.wildcards.run, dict(snakemake.params.settings),
    ),
    snakemake.log[0],
)
