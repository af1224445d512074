rule prepare_model:
    # Any source (hub id, local folder, GGUF) becomes a local safetensors folder once. A localrule, so on a
    # cluster it runs where the hub is reachable and compute nodes only ever read local files.
    input:
        files=lambda wildcards: model_files(ENTRY[wildcards.run]),
    output:
        model=directory("results/{run}/model"),
    log:
        "results/{run}/logs/prepare_model.log",
    benchmark:
        "results/{run}/benchmarks/prepare_model.tsv"
    localrule: True
    conda:
        ENV
    resources:
        # from a local model's config.json; a hub id's size is known only once its config is read (in the job)
        mem_mb=lambda wildcards, attempt: attempt
        * memory.whole_model_mb(memory.model_shape(None, local_model_folder(ENTRY[wildcards.run]))),
    params:
        model=lambda wildcards: model_settings(ENTRY[wildcards.run]),
        code=script_code("../scripts/prepare_model.py"),
    script:
        "../scripts/prepare_model.py"
