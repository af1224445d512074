from neuron_embeddings.explorer import ExplorerSettings, LayerInputs, build_explorer
from neuron_embeddings.runner import run_stage

layers = list(snakemake.params.layers)
inputs = snakemake.input
per_layer = {
    layer: LayerInputs(
        embeddings=inputs.embeddings[i],
        clusters=inputs.clusters[i],
        metrics=inputs.metrics[i],
        importance=inputs.importance[i],
        similar=inputs.similar[i],
        sweep=inputs.sweep[i],
        selection=inputs.selection[i],
    )
    for i, layer in enumerate(layers)
}
run_stage(
    "explorer",
    lambda: build_explorer(
        snakemake.output.site,
        snakemake.params.run,
        per_layer,
        inputs.documents,
        ExplorerSettings(**snakemake.params.settings),
        importance_settings=dict(snakemake.params.importance),
        comparison_path=inputs.comparison[0] if inputs.comparison else None,
    ),
    snakemake.log[0],
)
