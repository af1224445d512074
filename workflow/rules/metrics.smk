rule neuron_metrics:
    input:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        clusters="results/{run}/clusters/layer-{layer}.parquet",
        selection="results/{run}/selection/layer-{layer}.safetensors",
        embedding_weights="results/{run}/embeddings/layer-{layer}.weights.safetensors",
    output:
        metrics="results/{run}/metrics/layer-{layer}.parquet",
    log:
        "results/{run}/logs/neuron_metrics/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/neuron_metrics/layer-{layer}.tsv"
    conda:
        ENV
    resources:
        mem_mb=remake_mem_mb,
    params:
        layer=lambda wildcards: int(wildcards.layer),
        settings=metric_settings(),
        code=script_code("../scripts/neuron_metrics.py"),
    script:
        "../scripts/neuron_metrics.py"


rule summarize_run:
    input:
        metrics=lambda wildcards: expand(
            "results/{run}/metrics/layer-{layer}.parquet", run=wildcards.run, layer=ENTRY[wildcards.run]["layers"]
        ),
    output:
        summary="results/{run}/metrics/summary.json",
    log:
        "results/{run}/logs/summarize_run.log",
    benchmark:
        "results/{run}/benchmarks/summarize_run.tsv"
    conda:
        ENV
    params:
        layers=lambda wildcards: ENTRY[wildcards.run]["layers"],
        code=script_code("../scripts/summarize_run.py"),
    script:
        "../scripts/summarize_run.py"
