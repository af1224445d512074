# SAE latents as units (config key `sae`): train an SAE on a layer's MLP activations (GPU) or import one in the
# SAELens layout, measure its quality (GPU), then run the neurons' own selection, embedding, clustering and
# metrics code on its latents, and compare them with the layer's neurons. Everything lands in results/<run>/sae/<name>/.
# The helpers (SAES, sae_layer, ...) are in common.smk. Each script imports only the neuron_embeddings.sae module it
# runs (its code hash, params.code, covers that module and what it imports).


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
    log:
        f"{RUN}/logs/train_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/train_sae/{{sae}}.tsv"
    wildcard_constraints:
        sae=sae_names_regex("train"),
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=layer_model_mem_mb,
    params:
        layer=sae_layer,
        settings=sae_training_settings,
        window_tokens=config["corpus"]["window_tokens"],
        compute=compute_params(),
        trust_remote_code=config["model"]["trust_remote_code"],
        code=script_code("../scripts/train_sae.py"),
    script:
        "../scripts/train_sae.py"


rule import_sae:
    # An external SAE in the SAELens layout, checked against its layer and saved beside the trained ones.
    input:
        model=MODEL_DIR,
        cfg=lambda wildcards: os.path.join(os.path.expanduser(SAES[wildcards.sae]["path"]), "cfg.json"),
        weights=lambda wildcards: os.path.join(
            os.path.expanduser(SAES[wildcards.sae]["path"]), "sae_weights.safetensors"
        ),
    output:
        cfg=f"{SAE_DIR}/{{sae}}/cfg.json",
        weights=f"{SAE_DIR}/{{sae}}/sae_weights.safetensors",
    log:
        f"{RUN}/logs/import_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/import_sae/{{sae}}.tsv"
    wildcard_constraints:
        sae=sae_names_regex("external"),
    conda:
        ENV
    params:
        layer=sae_layer,
        path=lambda wildcards: os.path.expanduser(SAES[wildcards.sae]["path"]),
        code=script_code("../scripts/import_sae.py"),
    script:
        "../scripts/import_sae.py"


rule sae_activation_stats:
    # Pass 1 of the threshold selection, on every SAE's latents at once: one forward pass per corpus shard. Every
    # list of inputs and outputs is in SAE_NAMES order, one entry per SAE (what cache_sae.py zips with the names).
    input:
        model=MODEL_DIR,
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
        cfgs=expand(f"{SAE_DIR}/{{name}}/cfg.json", name=SAE_NAMES),
        weights=expand(f"{SAE_DIR}/{{name}}/sae_weights.safetensors", name=SAE_NAMES),
        stats=[],
    output:
        per_sae=expand(f"{SAE_DIR}/{{name}}/stats/shard-{{{{shard}}}}.safetensors", name=SAE_NAMES),
    log:
        f"{RUN}/logs/sae_activation_stats/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/sae_activation_stats/shard-{{shard}}.tsv"
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=layer_model_mem_mb,
    params:
        saes={name: spec["layer"] for name, spec in SAES.items()},
        stats_only=True,
        window_tokens=config["corpus"]["window_tokens"],
        selection=sae_selection_params(),
        compute=compute_params(),
        trust_remote_code=config["model"]["trust_remote_code"],
        code=script_code("../scripts/cache_sae.py"),
    script:
        "../scripts/cache_sae.py"


use rule sae_activation_stats as cache_sae with:
    # The neurons' caching on every SAE's latents: one forward pass per corpus shard, up to the deepest SAE layer.
    input:
        model=MODEL_DIR,
        shard=f"{RUN}/corpus/shard-{{shard}}.parquet",
        cfgs=expand(f"{SAE_DIR}/{{name}}/cfg.json", name=SAE_NAMES),
        weights=expand(f"{SAE_DIR}/{{name}}/sae_weights.safetensors", name=SAE_NAMES),
        stats=expand(f"{SAE_DIR}/{{name}}/stats.safetensors", name=SAE_NAMES) if TWO_PASSES else [],
    output:
        per_sae=expand(f"{SAE_DIR}/{{name}}/activations/shard-{{{{shard}}}}.safetensors", name=SAE_NAMES),
    log:
        f"{RUN}/logs/cache_sae/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/cache_sae/shard-{{shard}}.tsv"
    params:
        stats_only=False,


rule merge_sae_stats:
    input:
        shards=expand(f"{SAE_DIR}/{{{{sae}}}}/stats/shard-{{shard}}.safetensors", shard=SHARDS),
    output:
        stats=f"{SAE_DIR}/{{sae}}/stats.safetensors",
    log:
        f"{RUN}/logs/merge_sae_stats/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/merge_sae_stats/{{sae}}.tsv"
    conda:
        ENV
    params:
        layer=sae_layer,
        code=script_code("../scripts/merge_sae_stats.py"),
    script:
        "../scripts/merge_sae_stats.py"


rule select_sae_examples:
    input:
        caches=expand(f"{SAE_DIR}/{{{{sae}}}}/activations/shard-{{shard}}.safetensors", shard=SHARDS),
        corpus=CORPUS_SHARDS,
    output:
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
    log:
        f"{RUN}/logs/select_sae_examples/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/select_sae_examples/{{sae}}.tsv"
    conda:
        ENV
    params:
        layer=sae_layer,
        selection=sae_selection_params(),
        k=selection_k(),
        code=script_code("../scripts/select_sae_examples.py"),
    script:
        "../scripts/select_sae_examples.py"


rule embed_sae_latents:
    input:
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
        cfg=f"{SAE_DIR}/{{sae}}/cfg.json",
        weights=f"{SAE_DIR}/{{sae}}/sae_weights.safetensors",
        model=MODEL_DIR,
        corpus=CORPUS_SHARDS,
    output:
        embeddings=f"{SAE_DIR}/{{sae}}/embeddings.parquet",
        embedding_weights=f"{SAE_DIR}/{{sae}}/embedding-weights.safetensors",
    log:
        f"{RUN}/logs/embed_sae_latents/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/embed_sae_latents/{{sae}}.tsv"
    conda:
        ENV
    params:
        layer=sae_layer,
        trust_remote_code=config["model"]["trust_remote_code"],
        code=script_code("../scripts/embed_sae_latents.py"),
    script:
        "../scripts/embed_sae_latents.py"


use rule cluster_features as cluster_sae_latents with:
    # The same clusterer and threshold as the neurons of the SAE's layer.
    input:
        embeddings=f"{SAE_DIR}/{{sae}}/embeddings.parquet",
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
        embedding_weights=f"{SAE_DIR}/{{sae}}/embedding-weights.safetensors",
    output:
        clusters=f"{SAE_DIR}/{{sae}}/clusters.parquet",
    log:
        f"{RUN}/logs/cluster_sae_latents/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/cluster_sae_latents/{{sae}}.tsv"
    params:
        layer=sae_layer,
        method=config["clustering"]["method"],
        threshold=lambda wildcards: threshold_for(SAES[wildcards.sae]["layer"], config["clustering"]["threshold"]),
        code=script_code("../scripts/cluster_features.py"),


use rule neuron_metrics as sae_latent_metrics with:
    input:
        embeddings=f"{SAE_DIR}/{{sae}}/embeddings.parquet",
        clusters=f"{SAE_DIR}/{{sae}}/clusters.parquet",
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
        embedding_weights=f"{SAE_DIR}/{{sae}}/embedding-weights.safetensors",
    output:
        metrics=f"{SAE_DIR}/{{sae}}/metrics.parquet",
    log:
        f"{RUN}/logs/sae_latent_metrics/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/sae_latent_metrics/{{sae}}.tsv"
    params:
        layer=sae_layer,
        settings=metric_settings(),
        code=script_code("../scripts/neuron_metrics.py"),


rule evaluate_sae:
    # Runs the whole model (LM head included) three times on the held-out windows: clean, spliced, zero-ablated.
    input:
        model=MODEL_DIR,
        cfg=f"{SAE_DIR}/{{sae}}/cfg.json",
        weights=f"{SAE_DIR}/{{sae}}/sae_weights.safetensors",
        corpus=CORPUS_SHARDS,
        selection=f"{SAE_DIR}/{{sae}}/selection.safetensors",
    output:
        quality=f"{SAE_DIR}/{{sae}}/quality.json",
    log:
        f"{RUN}/logs/evaluate_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_sae/{{sae}}.tsv"
    conda:
        ENV
    threads: config["activations"]["threads"]
    resources:
        gpu=config["activations"]["gpus"],
        mem_mb=whole_model_mem_mb,
    params:
        layer=sae_layer,
        eval_tokens=SAE["eval_tokens"],
        seed=SAE["training"]["seed"],
        compute=compute_params(),
        trust_remote_code=config["model"]["trust_remote_code"],
        code=script_code("../scripts/evaluate_sae.py"),
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
    log:
        f"{RUN}/logs/compare_sae/{{sae}}.log",
    benchmark:
        f"{RUN}/benchmarks/compare_sae/{{sae}}.tsv"
    conda:
        ENV
    params:
        layer=sae_layer,
        bootstrap=SAE["bootstrap"],
        code=script_code("../scripts/compare_sae.py"),
    script:
        "../scripts/compare_sae.py"
