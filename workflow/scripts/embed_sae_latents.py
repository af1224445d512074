import os

from neuron_embeddings.runner import run_stage
from neuron_embeddings.sae.embedding import embed_latents

name = snakemake.wildcards.sae
run_stage(
    f"embed_sae_latents {name}",
    lambda: embed_latents(
        snakemake.input.selection,
        os.path.dirname(snakemake.input.cfg),
        snakemake.input.model,
        list(snakemake.input.corpus),
        snakemake.output.embeddings,
        snakemake.params.layer,
        name,
        trust_remote_code=snakemake.params.trust_remote_code,
        weights_path=snakemake.output.embedding_weights,
    ),
    snakemake.log[0],
)
