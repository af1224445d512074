rule tokenize_corpus:
    input:
        model=rules.prepare_model.output[0],
        corpus=corpus_files(),
    output:
        documents=f"{RUN}/corpus/documents.parquet",
        shards=expand(f"{RUN}/corpus/shard-{{shard}}.parquet", shard=SHARDS),
    params:
        corpus=config["corpus"],
        shard_names=SHARDS,
        code=code_version("corpus", "schemas", "storage"),
    log:
        f"{RUN}/logs/tokenize_corpus.log",
    benchmark:
        f"{RUN}/benchmarks/tokenize_corpus.tsv"
    conda:
        ENV
    script:
        "../scripts/tokenize_corpus.py"
