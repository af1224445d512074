# Every model of the run side by side (config key models): polysemanticity per matched layer, with bootstrap
# intervals and the baselines, for a trained model against its random-initialised control, checkpoints of one
# training run, or different models on one corpus.
rule compare_models:
    input:
        metrics=[
            f"results/{run}/metrics/layer-{layer}.parquet" for run, entry in ENTRY.items() for layer in entry["layers"]
        ],
        summaries=[f"results/{run}/metrics/summary.json" for run in ENTRY],
        models=[f"results/{run}/model" for run in ENTRY],
    output:
        json=f"{RUN}/comparison/comparison.json",
        html=f"{RUN}/comparison/index.html",
    log:
        f"{RUN}/logs/compare_models.log",
    benchmark:
        f"{RUN}/benchmarks/compare_models.tsv"
    conda:
        ENV
    params:
        models={entry["name"]: {"run": run, "layers": entry["layers"]} for run, entry in ENTRY.items()},
        resamples=config["comparison"]["bootstrap"],
        seed=config["comparison"]["seed"],
        code=script_code("../scripts/compare_models.py"),
    script:
        "../scripts/compare_models.py"
