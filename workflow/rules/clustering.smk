rule cluster_features:
    input:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        selection="results/{run}/selection/layer-{layer}.safetensors",
        embedding_weights="results/{run}/embeddings/layer-{layer}.weights.safetensors",
    output:
        clusters="results/{run}/clusters/layer-{layer}.parquet",
    log:
        "results/{run}/logs/cluster_features/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/cluster_features/layer-{layer}.tsv"
    conda:
        ENV
    resources:
        mem_mb=remake_mem_mb,
    params:
        layer=lambda wildcards: int(wildcards.layer),
        method=config["clustering"]["method"],
        threshold=lambda wildcards: threshold_for(int(wildcards.layer), config["clustering"]["threshold"]),
        code=script_code("../scripts/cluster_features.py"),
    script:
        "../scripts/cluster_features.py"
