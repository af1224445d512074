from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer_stats

layer = int(snakemake.wildcards.layer)
caches = [f"{folder}/layer-{layer}.safetensors" for folder in snakemake.input.stats]  # one folder per shard
run_stage(
    f"merge_stats layer {layer}",
    lambda: merge_layer_stats(caches, snakemake.output.stats, layer),
    snakemake.log[0],
)
