from neuron_embeddings.embeddings import build_embeddings
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"embed_neurons layer {layer}",
    lambda: build_embeddings(
        snakemake.input.selection,
        snakemake.input.model,
        list(snakemake.input.corpus),
        snakemake.output.embeddings,
        layer,
        trust_remote_code=snakemake.params.trust_remote_code,
        weights_path=snakemake.output.embedding_weights,
    ),
    snakemake.log[0],
)
