# SAE latents as units (config key `sae`): train an SAE on a layer's MLP activations (GPU) or import one in the
# SAELens layout, measure its quality (GPU), then run the neurons' own selection, embedding, clustering and
# metrics code on its latents, and compare them with the layer's neurons. Everything lands in results/<run>/sae/<name>/.
# The helpers (SAES, sae_files, ...) are in common.smk.


wildcard_constraints:
    sae=r"[A-Za-z0-9._-]+",


rule train_sae:
    # Streams the layer's MLP activations from the model over the corpus (the held-out windows excepted).
    input:
        model=MODEL_DIR,
        corpus=CORPUS_SHARDS,
    output:
        cfg=f"{SAE_DIR}/{{sae}}/cfg.json",
        weights=f"{SAE_DIR}/{{sae}}/sae_weights.safetensors",
        training=f"{SAE_DIR}/{{sae}}/training.json",
    wildcard_constraints:
        sae=sae_names_regex("train"),
    params:
        layer=sae_layer,
        settings=sae_training_settings,
        window_tokens=config["corpus"]["window_tokens"],
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("sae"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=layer_model_mem_mb,
    log:
        f"{RUN}/logs/train_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/train_sae/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/train_sae.py"


rule import_sae:
    # An external SAE in the SAELens layout, checked against its layer and saved beside the trained ones.
    input:
        model=MODEL_DIR,
        files=lambda wildcards: [
            os.path.join(os.path.expanduser(SAES[wildcards.sae]["path"]), name)
            for name in ("cfg.json", "sae_weights.safetensors")
        ],
    output:
        cfg=f"{SAE_DIR}/{{sae}}/cfg.json",
        weights=f"{SAE_DIR}/{{sae}}/sae_weights.safetensors",
    wildcard_constraints:
        sae=sae_names_regex("external"),
    params:
        layer=sae_layer,
        path=lambda wildcards: os.path.expanduser(SAES[wildcards.sae]["path"]),
        code=code_version("sae"),
    log:
        f"{RUN}/logs/import_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/import_sae/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/import_sae.py"


rule sae_activation_stats:
    # Pass 1 of the threshold selection, on every SAE's latents at once: one forward pass per corpus shard.
    input:
        model=MODEL_DIR,
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
        saes=[path for name in SAE_NAMES for path in sae_files(name)],
    output:
        expand(f"{SAE_DIR}/{{name}}/stats/shard-{{{{shard}}}}.safetensors", name=SAE_NAMES),
    params:
        saes={name: spec["layer"] for name, spec in SAES.items()},
        stats_only=True,
        window_tokens=config["corpus"]["window_tokens"],
        selection=sae_selection_params(),
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("sae", "activations", "topk"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=layer_model_mem_mb,
    log:
        f"{RUN}/logs/sae_activation_stats/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/sae_activation_stats/shard-{{shard}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cache_sae.py"


rule merge_sae_stats:
    input:
        expand(f"{SAE_DIR}/{{{{sae}}}}/stats/shard-{{shard}}.safetensors", shard=SHARDS),
    output:
        f"{SAE_DIR}/{{sae}}/stats.safetensors",
    params:
        layer=sae_layer,
        code=code_version("selection", "topk", "storage"),
    log:
        f"{RUN}/logs/merge_sae_stats/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/merge_sae_stats/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/merge_sae_stats.py"


rule cache_sae:
    # The neurons' caching on every SAE's latents: one forward pass per corpus shard, up to the deepest SAE layer.
    input:
        model=MODEL_DIR,
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
        saes=[path for name in SAE_NAMES for path in sae_files(name)],
        stats=expand(f"{SAE_DIR}/{{name}}/stats.safetensors", name=SAE_NAMES) if SELECTION_MODE == "threshold" else [],
    output:
        expand(f"{SAE_DIR}/{{name}}/activations/shard-{{{{shard}}}}.safetensors", name=SAE_NAMES),
    params:
        saes={name: spec["layer"] for name, spec in SAES.items()},
        stats_only=False,
        window_tokens=config["corpus"]["window_tokens"],
        selection=sae_selection_params(),
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("sae", "activations", "topk"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=layer_model_mem_mb,
    log:
        f"{RUN}/logs/cache_sae/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/cache_sae/shard-{{shard}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cache_sae.py"


rule select_sae_examples:
    input:
        caches=expand(f"{SAE_DIR}/{{{{sae}}}}/activations/shard-{{shard}}.safetensors", shard=SHARDS),
        corpus=CORPUS_SHARDS,
    output:
        f"{SAE_DIR}/{{sae}}/selection.safetensors",
    params:
        layer=sae_layer,
        selection=sae_selection_params(),
        k=selection_k(),
        code=code_version("selection", "topk", "storage"),
    log:
        f"{RUN}/logs/select_sae_examples/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/select_sae_examples/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/select_sae_examples.py"


rule embed_sae_latents:
    input:
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
        sae=lambda wildcards: sae_files(wildcards.sae),
        model=MODEL_DIR,
        corpus=CORPUS_SHARDS,
    output:
        f"{SAE_DIR}/{{sae}}/embeddings.parquet",
    params:
        layer=sae_layer,
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("sae", "embeddings"),
    log:
        f"{RUN}/logs/embed_sae_latents/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/embed_sae_latents/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/embed_sae_latents.py"


rule cluster_sae_latents:
    # The same clusterer and threshold as the neurons of the SAE's layer.
    input:
        f"{SAE_DIR}/{{sae}}/embeddings.parquet",
    output:
        f"{SAE_DIR}/{{sae}}/clusters.parquet",
    params:
        layer=sae_layer,
        method=config["clustering"]["method"],
        threshold=lambda wildcards: threshold_for(SAES[wildcards.sae]["layer"], config["clustering"]["threshold"]),
        code=code_version("clustering", "embeddings", "schemas"),
    log:
        f"{RUN}/logs/cluster_sae_latents/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/cluster_sae_latents/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/cluster_sae_latents.py"


rule sae_latent_metrics:
    input:
        embeddings=f"{SAE_DIR}/{{sae}}/embeddings.parquet",
        clusters=f"{SAE_DIR}/{{sae}}/clusters.parquet",
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
    output:
        f"{SAE_DIR}/{{sae}}/metrics.parquet",
    params:
        layer=sae_layer,
        settings=metric_settings(),
        code=code_version("metrics", "clustering", "embeddings", "schemas"),
    log:
        f"{RUN}/logs/sae_latent_metrics/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/sae_latent_metrics/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/sae_latent_metrics.py"


rule evaluate_sae:
    # Runs the whole model (LM head included) three times on the held-out windows: clean, spliced, zero-ablated.
    input:
        model=MODEL_DIR,
        sae=lambda wildcards: sae_files(wildcards.sae),
        corpus=CORPUS_SHARDS,
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
    output:
        f"{SAE_DIR}/{{sae}}/quality.json",
    params:
        layer=sae_layer,
        eval_tokens=SAE.get("eval_tokens", 2048),
        seed=(SAE.get("training") or {}).get("seed", 0),
        compute=compute_params(),
        trust_remote_code=config["model"].get("trust_remote_code", False),
        code=code_version("sae"),
    threads: config["activations"].get("threads", 2)
    resources:
        gpu=config["activations"].get("gpus", 1),
        mem_mb=whole_model_mem_mb,
    log:
        f"{RUN}/logs/evaluate_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_sae/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/evaluate_sae.py"


rule compare_sae:
    input:
        neurons=lambda wildcards: f"{RUN}/metrics/layer-{SAES[wildcards.sae]['layer']}.parquet",
        latents=f"{SAE_DIR}/{{sae}}/metrics.parquet",
        quality=f"{SAE_DIR}/{{sae}}/quality.json",
    output:
        json=f"{SAE_DIR}/{{sae}}/comparison.json",
        png=report(
            f"{RUN}/report/sae-{{sae}}.png",
            caption="../report/sae.rst",
            category="SAE latents vs neurons",
            labels={"sae": "{sae}"},
        ),
    params:
        layer=sae_layer,
        bootstrap=SAE.get("bootstrap", 1000),
        code=code_version("sae"),
    log:
        f"{RUN}/logs/compare_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/compare_sae/{{sae}}.tsv"
    conda:
        ENV
    script:
        "../scripts/compare_sae.py"
