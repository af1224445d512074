from neuron_embeddings.export.common import pad_token_id
from neuron_embeddings.export.delphi import export_delphi_layer
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"export_delphi layer {layer}",
    lambda: export_delphi_layer(
        snakemake.input.embeddings, snakemake.input.clusters, list(snakemake.input.corpus), snakemake.output.delphi,
        layer, snakemake.wildcards.run, pad_token_id(snakemake.input.model), snakemake.params.splits,
    ),
    snakemake.log[0],
)
