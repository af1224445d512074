rule activation_stats:
    # Pass 1 of the threshold selection: each neuron's max (and mean, positive share, histogram) per shard.
    input:
        model="results/{run}/model",
        shard=corpus_shard,
    output:
        stats=directory("results/{run}/stats/{group}/shard-{shard}"),
    log:
        "results/{run}/logs/activation_stats/{group}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/activation_stats/{group}/shard-{shard}.tsv"
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        compute=compute_params(),
        trust_remote_code=trusts_remote_code,
        code=script_code("../scripts/activation_stats.py"),
    script:
        "../scripts/activation_stats.py"


rule merge_stats:
    input:
        stats=lambda wildcards: layer_caches("stats", wildcards.run, wildcards.layer),
    output:
        stats="results/{run}/stats/layer-{layer}.safetensors",
    log:
        "results/{run}/logs/merge_stats/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/merge_stats/layer-{layer}.tsv"
    conda:
        ENV
    params:
        code=script_code("../scripts/merge_stats.py"),
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
        caches=directory("results/{run}/activations/{group}/shard-{shard}"),
    log:
        "results/{run}/logs/cache_activations/{group}/shard-{shard}.log",
    benchmark:
        "results/{run}/benchmarks/cache_activations/{group}/shard-{shard}.tsv"
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=caching_mem_mb,
        gpu_mem_mb=caching_gpu_mem_mb,
    params:
        layers=lambda wildcards: group_layers(wildcards.group),
        window_tokens=config["corpus"]["window_tokens"],
        selection=cache_selection,
        compute=compute_params(),
        trust_remote_code=trusts_remote_code,
        code=script_code("../scripts/cache_activations.py"),
    script:
        "../scripts/cache_activations.py"
