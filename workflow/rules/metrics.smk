rule neuron_metrics:
    input:
        embeddings=f"{RUN}/embeddings/layer-{{layer}}.parquet",
        clusters=f"{RUN}/clusters/layer-{{layer}}.parquet",
        selection=f"{RUN}/selection/layer-{{layer}}.safetensors",
    output:
        f"{RUN}/metrics/layer-{{layer}}.parquet",
    params:
        code=code_version("metrics", "clustering", "embeddings", "schemas"),
    log:
        f"{RUN}/logs/neuron_metrics/layer-{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/neuron_metrics/layer-{{layer}}.tsv"
    conda:
        ENV
    script:
        "../scripts/neuron_metrics.py"


rule summarize_run:
    input:
        expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
    output:
        f"{RUN}/metrics/summary.json",
    params:
        layers=LAYERS,
        code=code_version("metrics"),
    log:
        f"{RUN}/logs/summarize_run.log",
    benchmark:
        f"{RUN}/benchmarks/summarize_run.tsv"
    conda:
        ENV
    script:
        "../scripts/summarize_run.py"
