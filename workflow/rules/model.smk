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
    resources:
        # from a local model's config.json; a hub id's size is known only once its config is read (in the job)
        mem_mb=lambda wildcards, attempt: attempt * memory.whole_model_mb(memory.model_shape(None, local_model_folder())),
    localrule: True
    conda:
        ENV
    script:
        "../scripts/prepare_model.py"
