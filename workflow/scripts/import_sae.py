import os

from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.saelens_io import import_sae

name = snakemake.wildcards.sae
run_stage(
    f"import_sae {name}",
    lambda: import_sae(
        snakemake.params.path, os.path.dirname(snakemake.output.cfg), snakemake.params.layer, snakemake.input.model
    ),
    snakemake.log[0],
)
