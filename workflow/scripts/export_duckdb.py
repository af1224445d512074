from neuron_embeddings.export.sql import write_views
from neuron_embeddings.runner import run_stage

run_stage(
    "export_duckdb",
    lambda: write_views(snakemake.output.views, list(snakemake.params.layers)),
    snakemake.log[0],
)
