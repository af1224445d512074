rule select_examples:
    # Merge the shard caches of one layer: each neuron's final examples, deterministic whatever the shard order.
    input:
        lambda wildcards: shard_caches(wildcards.layer),
    output:
        f"{RUN}/selection/layer-{{layer}}.safetensors",
    params:
        selection={k: config["selection"][k] for k in ("mode", "top_k") if k in config["selection"]},
        code=code_version("selection", "topk"),
    log:
        f"{RUN}/logs/select_examples/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/select_examples/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/select_examples.py"
