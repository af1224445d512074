# The paper's analyses beyond clustering: token importance (runs the model, GPU-tagged), similar features across
# neurons, the threshold sweep, and the per-layer plots and run table of the Snakemake report.
rule token_importance:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_SHARDS,
        embeddings=f"{RUN}/embeddings/layer-{{layer}}.parquet",
        clusters=f"{RUN}/clusters/layer-{{layer}}.parquet",
        metrics=f"{RUN}/metrics/layer-{{layer}}.parquet",
    output:
        f"{RUN}/importance/layer-{{layer}}.parquet",
    params:
        settings=importance_settings(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("importance"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=layer_model_mem_mb,
    log:
        f"{RUN}/logs/token_importance/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/token_importance/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/token_importance.py"


rule similar_features:
    input:
        selection=f"{RUN}/selection/layer-{{layer}}.safetensors",
        clusters=f"{RUN}/clusters/layer-{{layer}}.parquet",
    output:
        f"{RUN}/similar/layer-{{layer}}.parquet",
    params:
        top_k=ANALYSES["similar"].get("top_k", 20),
        min_similarity=ANALYSES["similar"].get("min_similarity", 0.5),
        backend=ANALYSES["similar"].get("backend", "faiss"),
        code=code_version("similar", "embeddings", "schemas", "storage"),
    threads: 2
    log:
        f"{RUN}/logs/similar_features/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/similar_features/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/similar_features.py"


rule threshold_sweep:
    input:
        f"{RUN}/embeddings/layer-{{layer}}.parquet",
    output:
        f"{RUN}/sweep/layer-{{layer}}.parquet",
    params:
        thresholds=ANALYSES["sweep"].get("thresholds", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
        method=config["clustering"]["method"],
        code=code_version("sweep", "clustering", "embeddings", "schemas", "storage"),
    log:
        f"{RUN}/logs/threshold_sweep/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/threshold_sweep/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/threshold_sweep.py"


rule analysis_figures:
    # One job for every layer's figure and the run table: plotting is cheap, a job's start-up is not.
    input:
        summary=f"{RUN}/metrics/summary.json",
        metrics=expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
        sweep=expand(f"{RUN}/sweep/layer-{{layer}}.parquet", layer=LAYERS),
        similar=expand(f"{RUN}/similar/layer-{{layer}}.parquet", layer=LAYERS),
        importance=expand(f"{RUN}/importance/layer-{{layer}}.parquet", layer=LAYERS),
    output:
        figures=report(
            expand(f"{RUN}/report/layer-{{layer}}.png", layer=LAYERS),
            caption="../report/layer.rst",
            category="Layers",
        ),
        table=report(f"{RUN}/report/summary.tsv", caption="../report/summary.rst", category="Summary"),
    params:
        layers=LAYERS,
        code=code_version("sweep", "schemas", "storage"),
    log:
        f"{RUN}/logs/analysis_figures.log",
    benchmark:
        f"{RUN}/benchmarks/analysis_figures.tsv"
    conda:
        ENV
    script:
        "../scripts/analysis_figures.py"
