from neuron_embeddings.runner import run_stage
from neuron_embeddings.toy import summarise_toys

run_stage(
    "summarise_toys",
    lambda: summarise_toys(list(snakemake.input), snakemake.output.table, snakemake.output.choice, snakemake.output.png),
    snakemake.log[0],
)
