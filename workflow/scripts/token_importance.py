from neuron_embeddings.importance import ImportanceSettings, compute_importance
from neuron_embeddings.runner import run_stage

layer = int(snakemake.wildcards.layer)
run_stage(
    f"token_importance layer {layer}",
    lambda: compute_importance(
        snakemake.input.model,
        list(snakemake.input.corpus),
        snakemake.input.embeddings,
        snakemake.input.clusters,
        snakemake.input.metrics,
        snakemake.output.importance,
        layer,
        ImportanceSettings(**snakemake.params.settings),
        trust_remote_code=snakemake.params.trust_remote_code,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
