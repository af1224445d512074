rule cluster_features:
    input:
        f"{RUN}/embeddings/layer-{{layer}}.parquet",
    output:
        f"{RUN}/clusters/layer-{{layer}}.parquet",
    params:
        method=config["clustering"].get("method", "threshold_graph"),
        threshold=lambda wildcards: threshold_for(int(wildcards.layer), config["clustering"]["threshold"]),
        code=code_version("clustering", "embeddings", "schemas"),
    log:
        f"{RUN}/logs/cluster_features/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/cluster_features/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cluster_features.py"

