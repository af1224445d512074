rule select_examples:
    # Merge the shard caches of one layer: each neuron's final examples, deterministic whatever the shard order.
    input:
        caches=lambda wildcards: layer_caches("activations", wildcards.run, wildcards.layer),
        corpus=corpus_shards,  # repeated context windows count once per neuron
    output:
        selection="results/{run}/selection/layer-{layer}.safetensors",
    log:
        "results/{run}/logs/select_examples/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/select_examples/layer-{layer}.tsv"
    conda:
        ENV
    params:
        selection=cache_selection_params(),
        k=selection_k(),
        code=script_code("../scripts/select_examples.py"),
    script:
        "../scripts/select_examples.py"
