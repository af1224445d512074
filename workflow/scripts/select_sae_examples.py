from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer

selection = snakemake.params.selection
run_stage(
    f"select_sae_examples {snakemake.wildcards.sae}",
    lambda: merge_layer(
        list(snakemake.input.caches),
        snakemake.output[0],
        snakemake.params.k,
        snakemake.params.layer,
        mode=selection["mode"],
        quantile_per_bin=selection.get("quantile_per_bin", 0),
        corpus_shards=list(snakemake.input.corpus),
    ),
    snakemake.log[0],
)
