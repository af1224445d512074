rule embed_neurons:
    input:
        selection="results/{run}/selection/layer-{layer}.safetensors",
        model="results/{run}/model",
        corpus=corpus_shards,
    output:
        "results/{run}/embeddings/layer-{layer}.parquet",
    params:
        trust_remote_code=trusts_remote_code,
        code=code_version("embeddings", "adapters", "models", "schemas", "storage"),
    resources:
        mem_mb=embedding_mem_mb,
    log:
        "results/{run}/logs/embed_neurons/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/embed_neurons/layer-{layer}.tsv"
    conda:
        ENV
    script:
        "../scripts/embed_neurons.py"
