from neuron_embeddings.metrics import run_summary
from neuron_embeddings.runner import run_stage
from neuron_embeddings.storage import write_json


def main():
    summary = run_summary(dict(zip(snakemake.params.layers, snakemake.input.metrics)))
    write_json(summary, snakemake.output.summary)
    return summary


run_stage("summarize_run", main, snakemake.log[0])
