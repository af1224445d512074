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
        importance=f"{RUN}/importance/layer-{{layer}}.parquet",
    log:
        f"{RUN}/logs/token_importance/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/token_importance/layer-{{layer}}.tsv"
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=layer_model_mem_mb,
    params:
        settings=importance_settings(),
        trust_remote_code=config["model"]["trust_remote_code"],
        code=script_code("../scripts/token_importance.py"),
    script:
        "../scripts/token_importance.py"


rule similar_features:
    input:
        selection=f"{RUN}/selection/layer-{{layer}}.safetensors",
        clusters=f"{RUN}/clusters/layer-{{layer}}.parquet",
    output:
        similar=f"{RUN}/similar/layer-{{layer}}.parquet",
    log:
        f"{RUN}/logs/similar_features/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/similar_features/layer-{{layer}}.tsv"
    conda:
        ENV
    threads: 2
    params:
        top_k=ANALYSES["similar"]["top_k"],
        min_similarity=ANALYSES["similar"]["min_similarity"],
        backend=ANALYSES["similar"]["backend"],
        code=script_code("../scripts/similar_features.py"),
    script:
        "../scripts/similar_features.py"


rule threshold_sweep:
    input:
        embeddings=f"{RUN}/embeddings/layer-{{layer}}.parquet",
        selection=f"{RUN}/selection/layer-{{layer}}.safetensors",
        embedding_weights=f"{RUN}/embeddings/layer-{{layer}}.weights.safetensors",
    output:
        sweep=f"{RUN}/sweep/layer-{{layer}}.parquet",
    log:
        f"{RUN}/logs/threshold_sweep/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/threshold_sweep/layer-{{layer}}.tsv"
    conda:
        ENV
    resources:
        mem_mb=remake_mem_mb,
    params:
        thresholds=ANALYSES["sweep"]["thresholds"],
        method=config["clustering"]["method"],
        code=script_code("../scripts/threshold_sweep.py"),
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
    log:
        f"{RUN}/logs/analysis_figures.log",
    benchmark:
        f"{RUN}/benchmarks/analysis_figures.tsv"
    conda:
        ENV
    params:
        layers=LAYERS,
        code=script_code("../scripts/analysis_figures.py"),
    script:
        "../scripts/analysis_figures.py"
