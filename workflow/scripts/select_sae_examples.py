from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer

selection = snakemake.params.selection
run_stage(
    f"select_sae_examples {snakemake.wildcards.sae}",
    lambda: merge_layer(
        list(snakemake.input.caches),
        snakemake.output.selection,
        snakemake.params.k,
        snakemake.params.layer,
        mode=selection["mode"],
        quantile_per_bin=selection["quantile_per_bin"] if selection["mode"] == "threshold" else 0,
        corpus_shards=list(snakemake.input.corpus),
    ),
    snakemake.log[0],
)
