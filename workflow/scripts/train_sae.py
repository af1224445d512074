import os

from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.training import TrainSettings, train_sae

name = snakemake.wildcards.sae
run_stage(
    f"train_sae {name}",
    lambda: train_sae(
        snakemake.input.model,
        list(snakemake.input.corpus),
        snakemake.params.layer,
        out_dir=os.path.dirname(snakemake.output.cfg),
        training_path=snakemake.output.training,
        settings=TrainSettings(**snakemake.params.settings),
        window_tokens=snakemake.params.window_tokens,
        compute=snakemake.params.compute,
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
