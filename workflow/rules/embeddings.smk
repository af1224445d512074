rule embed_neurons:
    input:
        selection="results/{run}/selection/layer-{layer}.safetensors",
        model="results/{run}/model",
        corpus=corpus_shards,
    output:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        # the units' input weights, so the later stages remake the embedding column instead of reading it back
        embedding_weights="results/{run}/embeddings/layer-{layer}.weights.safetensors",
    log:
        "results/{run}/logs/embed_neurons/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/embed_neurons/layer-{layer}.tsv"
    conda:
        ENV
    resources:
        mem_mb=embedding_mem_mb,
    params:
        trust_remote_code=trusts_remote_code,
        code=script_code("../scripts/embed_neurons.py"),
    script:
        "../scripts/embed_neurons.py"
