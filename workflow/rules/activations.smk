rule activation_stats:
    # Pass 1 of the threshold selection: each neuron's max (and mean, positive share, histogram) per shard.
    input:
        model=rules.prepare_model.output[0],
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
    output:
        directory(f"{RUN}/stats/{{group}}/shard-{{shard}}"),
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("activations", "topk", "adapters", "models", "storage"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    log:
        f"{RUN}/logs/activation_stats/{{group}}/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/activation_stats/{{group}}/shard-{{shard}}.tsv"
    conda:
        ENV
    script:
        "../scripts/activation_stats.py"


rule merge_stats:
    input:
        lambda wildcards: layer_caches("stats", wildcards.layer),
    output:
        f"{RUN}/stats/layer-{{layer}}.safetensors",
    params:
        code=code_version("selection", "topk", "storage"),
    log:
        f"{RUN}/logs/merge_stats/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/merge_stats/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/merge_stats.py"


rule cache_activations:
    # The GPU stage: one job per corpus shard (and cache group), so a cluster caches many shards at once. Runs
    # on the CPU too. Writes one safetensors file per layer of its group into its folder.
    input:
        model=rules.prepare_model.output[0],
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
        stats=group_stats,
    output:
        directory(f"{RUN}/activations/{{group}}/shard-{{shard}}"),
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        selection=cache_selection,
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("activations", "topk", "adapters", "models", "storage"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    log:
        f"{RUN}/logs/cache_activations/{{group}}/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/cache_activations/{{group}}/shard-{{shard}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cache_activations.py"
