# Exports (config key export; each format off by default; docs/exports.md): the run's results in the formats of
# the tools researchers use next. Per layer a delphi latent cache and a Neuronpedia bulk-import folder; per run
# DuckDB views over the Parquet files. Each reads finished outputs only, so switching one on reruns nothing else.
from neuron_embeddings.export import export_targets  # all_targets() (common.smk) asks for them

EXPORT = config["export"]


rule export_delphi:
    input:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        clusters="results/{run}/clusters/layer-{layer}.parquet",
        corpus=corpus_shards,
        model="results/{run}/model",
    output:
        delphi=directory("results/{run}/export/delphi/layer-{layer}"),
    log:
        "results/{run}/logs/export_delphi/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/export_delphi/layer-{layer}.tsv"
    conda:
        ENV
    params:
        splits=EXPORT["delphi_splits"],
        code=script_code("../scripts/export_delphi.py"),
    script:
        "../scripts/export_delphi.py"


rule export_neuronpedia:
    input:
        embeddings="results/{run}/embeddings/layer-{layer}.parquet",
        clusters="results/{run}/clusters/layer-{layer}.parquet",
        metrics="results/{run}/metrics/layer-{layer}.parquet",
        corpus=corpus_shards,
    output:
        neuronpedia=directory("results/{run}/export/neuronpedia/layer-{layer}"),
    log:
        "results/{run}/logs/export_neuronpedia/layer-{layer}.log",
    benchmark:
        "results/{run}/benchmarks/export_neuronpedia/layer-{layer}.tsv"
    conda:
        ENV
    params:
        settings={key: value for key, value in EXPORT.items() if key.startswith("neuronpedia_")},
        code=script_code("../scripts/export_neuronpedia.py"),
    script:
        "../scripts/export_neuronpedia.py"


rule export_duckdb:
    input:
        embeddings=lambda wildcards: expand(
            "results/{run}/embeddings/layer-{layer}.parquet", run=wildcards.run, layer=ENTRY[wildcards.run]["layers"]
        ),
        clusters=lambda wildcards: expand(
            "results/{run}/clusters/layer-{layer}.parquet", run=wildcards.run, layer=ENTRY[wildcards.run]["layers"]
        ),
        metrics=lambda wildcards: expand(
            "results/{run}/metrics/layer-{layer}.parquet", run=wildcards.run, layer=ENTRY[wildcards.run]["layers"]
        ),
    output:
        views="results/{run}/export/duckdb/views.sql",
    log:
        "results/{run}/logs/export_duckdb.log",
    benchmark:
        "results/{run}/benchmarks/export_duckdb.tsv"
    conda:
        ENV
    params:
        layers=lambda wildcards: ENTRY[wildcards.run]["layers"],
        code=script_code("../scripts/export_duckdb.py"),
    script:
        "../scripts/export_duckdb.py"
