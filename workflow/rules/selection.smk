rule select_examples:
    # Merge the shard caches of one layer: each neuron's final examples, deterministic whatever the shard order.
    input:
        caches=lambda wildcards: layer_caches("activations", wildcards.run, wildcards.layer),
        corpus=corpus_shards,  # repeated context windows count once per neuron
    output:
        "results/{run}/selection/layer-{layer}.safetensors",
    params:
        selection=cache_selection_params(),
        k=selection_k(),
        code=code_version("selection", "topk", "storage"),
    log:
        "results/{run}/logs/select_examples/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/select_examples/layer-{layer}.tsv"
    conda:
        ENV
    script:
        "../scripts/select_examples.py"
