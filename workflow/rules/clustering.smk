rule cluster_features:
    input:
        "results/{run}/embeddings/layer-{layer}.parquet",
    output:
        "results/{run}/clusters/layer-{layer}.parquet",
    params:
        method=config["clustering"]["method"],
        threshold=lambda wildcards: threshold_for(int(wildcards.layer), config["clustering"]["threshold"]),
        code=code_version("clustering", "embeddings", "schemas"),
    log:
        "results/{run}/logs/cluster_features/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/cluster_features/layer-{layer}.tsv"
    conda:
        ENV
    script:
        "../scripts/cluster_features.py"

