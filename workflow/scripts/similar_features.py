from neuron_embeddings.runner import run_stage
from neuron_embeddings.similar import similar_features

layer = int(snakemake.wildcards.layer)
run_stage(
    f"similar_features layer {layer}",
    lambda: similar_features(
        snakemake.input.selection,
        snakemake.input.clusters,
        snakemake.output.similar,
        layer,
        top_k=snakemake.params.top_k,
        min_similarity=snakemake.params.min_similarity,
        backend=snakemake.params.backend,
        threads=snakemake.threads,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
