from neuron_embeddings.runner import run_stage
from neuron_embeddings.toy import summarize_toys

run_stage(
    "summarize_toys",
    lambda: summarize_toys(list(snakemake.input.scores), snakemake.output.table, snakemake.output.choice, snakemake.output.png),
    snakemake.log[0],
)
