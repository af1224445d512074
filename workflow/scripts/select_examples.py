from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer

layer = int(snakemake.wildcards.layer)
caches = [f"{folder}/layer-{layer}.safetensors" for folder in snakemake.input.caches]  # one folder per shard
selection = snakemake.params.selection
run_stage(
    f"select_examples layer {layer}",
    lambda: merge_layer(
        caches,
        snakemake.output.selection,
        snakemake.params.k,
        layer,
        mode=selection["mode"],
        quantile_per_bin=selection.get("quantile_per_bin", 0),
        corpus_shards=list(snakemake.input.corpus),
    ),
    snakemake.log[0],
)
