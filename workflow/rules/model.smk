rule prepare_model:
    # Any source (hub id, local folder, GGUF) becomes a local safetensors folder once. A localrule, so on a
    # cluster it runs where the hub is reachable and compute nodes only ever read local files.
    input:
        model_files(),
    output:
        directory(f"{RUN}/model"),
    params:
        model=config["model"],
        code=code_version("models", "adapters", "sources"),
    log:
        f"{RUN}/logs/prepare_model.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_model.tsv"
    localrule: True
    conda:
        ENV
    script:
        "../scripts/prepare_model.py"
