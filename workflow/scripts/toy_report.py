from neuron_embeddings.runner import run_stage
from neuron_embeddings.toy_report import write_toy_report

run_stage(
    "toy_report",
    lambda: write_toy_report(snakemake.input.choice, snakemake.input.png, snakemake.output.page, snakemake.params.settings),
    snakemake.log[0],
)
