from neuron_embeddings.runner import run_stage
from neuron_embeddings.selection import merge_layer

layer = int(snakemake.wildcards.layer)
run_stage(
    f"select_examples layer {layer}",
    lambda: merge_layer(list(snakemake.input), snakemake.output[0], snakemake.params.selection["top_k"], layer),
    snakemake.log[0],
)
