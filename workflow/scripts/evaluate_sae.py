import os

from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.evaluation import evaluate_sae

name = snakemake.wildcards.sae
run_stage(
    f"evaluate_sae {name}",
    lambda: evaluate_sae(
        snakemake.input.model,
        os.path.dirname(snakemake.input.cfg),
        list(snakemake.input.corpus),
        snakemake.input.selection,
        snakemake.output.quality,
        snakemake.params.layer,
        name,
        eval_tokens=snakemake.params.eval_tokens,
        seed=snakemake.params.seed,
        compute=snakemake.params.compute,
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
