rule embed_neurons:
    input:
        selection=f"{RUN}/selection/layer-{{layer}}.safetensors",
        model=rules.prepare_model.output[0],
        corpus=rules.tokenize_corpus.output.shards,
    output:
        f"{RUN}/embeddings/layer-{{layer}}.parquet",
    params:
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("embeddings", "adapters", "models", "schemas", "storage"),
    resources:
        mem_mb=embedding_mem_mb,
    log:
        f"{RUN}/logs/embed_neurons/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/embed_neurons/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/embed_neurons.py"
