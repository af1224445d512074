rule report:
    input:
        summary=f"{RUN}/metrics/summary.json",
        metrics=expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
        clusters=expand(f"{RUN}/clusters/layer-{{layer}}.parquet", layer=LAYERS),
        embeddings=expand(f"{RUN}/embeddings/layer-{{layer}}.parquet", layer=LAYERS),
        documents=DOCUMENTS,
        corpus_summary=f"{RUN}/corpus/summary.json",
        comparison=comparison_targets()[:1],  # the models compared, when the run has several
        sae_comparisons=[f"{SAE_DIR}/{name}/comparison.json" for name in SAE_NAMES],
        sae_figures=[f"{RUN}/report/sae-{name}.png" for name in SAE_NAMES],
    output:
        page=report(
            f"{RUN}/report/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    conda:
        ENV
    params:
        layers=LAYERS,
        run=config["run"],
        settings={k: config[k] for k in ("model", "selection", "clustering", "report")},
        corpus={k: v for k, v in config["corpus"].items()},
        code=script_code("../scripts/report.py"),
    script:
        "../scripts/report.py"
