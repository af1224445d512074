rule activation_stats:
    # Pass 1 of the threshold selection: each neuron's max (and mean, positive share, histogram) per shard.
    input:
        model="results/{run}/model",
        shard=corpus_shard,
    output:
        directory("results/{run}/stats/{group}/shard-{shard}"),
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        compute=compute_params(),
        trust_remote_code=trusts_remote_code,
        code=code_version("activations", "topk", "adapters", "models", "storage"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    log:
        "results/{run}/logs/activation_stats/{group}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/activation_stats/{group}/shard-{shard}.tsv"
    conda:
        ENV
    script:
        "../scripts/activation_stats.py"


rule merge_stats:
    input:
        lambda wildcards: layer_caches("stats", wildcards.run, wildcards.layer),
    output:
        "results/{run}/stats/layer-{layer}.safetensors",
    params:
        code=code_version("selection", "topk", "storage"),
    log:
        "results/{run}/logs/merge_stats/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/merge_stats/layer-{layer}.tsv"
    conda:
        ENV
    script:
        "../scripts/merge_stats.py"


rule cache_activations:
    # The GPU stage: one job per corpus shard (and cache group), so a cluster caches many shards at once. Runs
    # on the CPU too. Writes one safetensors file per layer of its group into its folder.
    input:
        model="results/{run}/model",
        shard=corpus_shard,
        stats=group_stats,
    output:
        directory("results/{run}/activations/{group}/shard-{shard}"),
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        selection=cache_selection,
        compute=compute_params(),
        trust_remote_code=trusts_remote_code,
        code=code_version("activations", "topk", "adapters", "models", "storage"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    log:
        "results/{run}/logs/cache_activations/{group}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/cache_activations/{group}/shard-{shard}.tsv"
    conda:
        ENV
    script:
        "../scripts/cache_activations.py"
