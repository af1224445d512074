rule select_examples:
    # Merge the shard caches of one layer: each neuron's final examples, deterministic whatever the shard order.
    input:
        lambda wildcards: layer_caches("activations", wildcards.layer),
    output:
        f"{RUN}/selection/layer-{{layer}}.safetensors",
    params:
        selection=cache_selection_params(),
        k=selection_k(),
        code=code_version("selection", "topk", "storage"),
    log:
        f"{RUN}/logs/select_examples/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/select_examples/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/select_examples.py"
