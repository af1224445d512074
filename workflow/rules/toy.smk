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
    params:
        model=config["model"],
        probe=config["probe"],
        clustering=config["clustering"],
        code=toy_code_version("toy"),
    threads: 1
    log:
        f"{TOY_RUN}/logs/train_toy/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/train_toy/input-{{input}}/sparsity-{{sparsity}}/seed-{{seed}}.tsv"
    conda:
        TOY_ENV
    script:
        "../scripts/train_toy.py"


rule summarise_toys:
    input:
        toy_scores(),
    output:
        table=f"{TOY_RUN}/recovery.parquet",
        choice=f"{TOY_RUN}/choice.json",
        png=report(f"{TOY_RUN}/report/recovery.png", caption="../report/toy.rst", category="Toy models"),
    params:
        code=toy_code_version("toy"),
    log:
        f"{TOY_RUN}/logs/summarise_toys.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/summarise_toys.tsv"
    conda:
        TOY_ENV
    script:
        "../scripts/summarise_toys.py"


rule toy_report:
    input:
        choice=rules.summarise_toys.output.choice,
        png=rules.summarise_toys.output.png,
    output:
        f"{TOY_RUN}/report/index.html",
    params:
        settings={k: config[k] for k in ("model", "probe", "input_dims", "sparsities", "seeds", "clustering")},
        code=toy_code_version("toy", "report"),
    log:
        f"{TOY_RUN}/logs/toy_report.log",
    benchmark:
        f"{TOY_RUN}/benchmarks/toy_report.tsv"
    conda:
        TOY_ENV
    script:
        "../scripts/toy_report.py"
