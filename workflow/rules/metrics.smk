rule neuron_metrics:
    input:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        clusters="results/{run}/clusters/layer-{layer}.parquet",
        selection="results/{run}/selection/layer-{layer}.safetensors",
    output:
        "results/{run}/metrics/layer-{layer}.parquet",
    params:
        settings=metric_settings(),
        code=code_version("metrics", "clustering", "embeddings", "schemas"),
    log:
        "results/{run}/logs/neuron_metrics/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/neuron_metrics/layer-{layer}.tsv"
    conda:
        ENV
    script:
        "../scripts/neuron_metrics.py"


rule summarize_run:
    input:
        lambda wildcards: expand(
            "results/{run}/metrics/layer-{layer}.parquet", run=wildcards.run, layer=ENTRY[wildcards.run]["layers"]
        ),
    output:
        "results/{run}/metrics/summary.json",
    params:
        layers=lambda wildcards: ENTRY[wildcards.run]["layers"],
        code=code_version("metrics"),
    log:
        "results/{run}/logs/summarize_run.log",
    benchmark:
        "results/{run}/benchmarks/summarize_run.tsv"
    conda:
        ENV
    script:
        "../scripts/summarize_run.py"
