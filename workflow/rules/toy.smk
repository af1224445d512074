# Toy models with known features: train one model per (input, sparsity, seed), probe and score its neurons, then choose
# the clustering default and tabulate recovery against sparsity. Helpers in toy_common.smk.


wildcard_constraints:
    input=r"\d+",
    sparsity=r"\d\.\d{3}",
    seed=r"\d+",


rule train_toy:
    # Trains the toy model (CPU, seconds), then probes, embeds, clusters and scores its neurons at every setting.
    output:
        model=f"{TOY_RUN}/models/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.safetensors",
        scores=f"{TOY_RUN}/scores/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.parquet",
    log:
        f"{TOY_RUN}/logs/train_toy/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/train_toy/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.tsv"
    conda:
        TOY_ENV
    threads: 1
    params:
        model=config["model"],
        probe=config["probe"],
        clustering=config["clustering"],
        code=script_code("../scripts/train_toy.py"),
    script:
        "../scripts/train_toy.py"


rule summarize_toys:
    input:
        scores=toy_scores(),
    output:
        table=f"{TOY_RUN}/recovery.parquet",
        choice=f"{TOY_RUN}/choice.json",
        png=report(f"{TOY_RUN}/report/recovery.png", caption="../report/toy.rst", category="Toy models"),
    log:
        f"{TOY_RUN}/logs/summarize_toys.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/summarize_toys.tsv"
    conda:
        TOY_ENV
    params:
        code=script_code("../scripts/summarize_toys.py"),
    script:
        "../scripts/summarize_toys.py"


rule toy_report:
    input:
        choice=rules.summarize_toys.output.choice,
        png=rules.summarize_toys.output.png,
    output:
        page=f"{TOY_RUN}/report/index.html",
    log:
        f"{TOY_RUN}/logs/toy_report.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/toy_report.tsv"
    conda:
        TOY_ENV
    params:
        settings={k: config[k] for k in ("model", "probe", "input_dims", "sparsities", "seeds", "clustering")},
        code=script_code("../scripts/toy_report.py"),
    script:
        "../scripts/toy_report.py"
