rule tokenize_corpus:
    input:
        model="results/{run}/model",
        corpus=corpus_files(),
    output:
        documents="results/{run}/corpus/documents.parquet",
        shards=expand("results/{run}/corpus/shard-{shard}.parquet", shard=SHARDS, allow_missing=True),
        summary="results/{run}/corpus/summary.json",
    log:
        "results/{run}/logs/tokenize_corpus.log",
    benchmark:
        "results/{run}/benchmarks/tokenize_corpus.tsv"
    # One corpus per tokenizer: models that tokenize alike (checks.tokenizer_key) read the first one's shards.
    wildcard_constraints:
        run=CORPUS_OWNERS,
    conda:
        ENV
    params:
        corpus=config["corpus"],
        shard_names=SHARDS,
        code=script_code("../scripts/tokenize_corpus.py"),
    script:
        "../scripts/tokenize_corpus.py"
