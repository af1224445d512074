# The explorer: a static site over the run (results/<run>/explorer/index.html), opened from disk or any server.
rule explorer:
    input:
        embeddings=expand(f"{RUN}/embeddings/layer-{{layer}}.parquet", layer=LAYERS),
        clusters=expand(f"{RUN}/clusters/layer-{{layer}}.parquet", layer=LAYERS),
        metrics=expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
        importance=expand(f"{RUN}/importance/layer-{{layer}}.parquet", layer=LAYERS),
        similar=expand(f"{RUN}/similar/layer-{{layer}}.parquet", layer=LAYERS),
        sweep=expand(f"{RUN}/sweep/layer-{{layer}}.parquet", layer=LAYERS),
        selection=expand(f"{RUN}/selection/layer-{{layer}}.safetensors", layer=LAYERS),
        documents=DOCUMENTS,
        comparison=comparison_targets()[:1],  # the other models at each layer, when the run has several
    output:
        site=directory(f"{RUN}/explorer"),
    log:
        f"{RUN}/logs/explorer.log",
    benchmark:
        f"{RUN}/benchmarks/explorer.tsv"
    conda:
        ENV
    params:
        run=config["run"],
        layers=LAYERS,
        settings={k: v for k, v in EXPLORER.items()},
        importance=importance_settings(),
        code=script_code("../scripts/explorer.py"),
    script:
        "../scripts/explorer.py"
