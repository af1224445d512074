rule cache_activations:
    # The GPU stage: one job per corpus shard, so a cluster caches many shards at once. Runs on the CPU too.
    input:
        model=rules.prepare_model.output[0],
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
    output:
        expand(f"{RUN}/activations/shard-{{{{shard}}}}/layer-{{layer}}.safetensors", layer=LAYERS),
    params:
        layers=LAYERS,
        window_tokens=config["corpus"]["window_tokens"],
        selection={k: v for k, v in config["selection"].items() if k != "mode"},
        activations={k: v for k, v in config["activations"].items() if k not in ("threads", "gpus")},
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("activations", "topk", "adapters", "models"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
    log:
        f"{RUN}/logs/cache_activations/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/cache_activations/shard-{{shard}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cache_activations.py"
