# What every stage shares: config validation, output paths, and the code versions that trigger reruns.
import glob
import json
import os
import re
import sys
from pathlib import Path

from snakemake.utils import validate

SRC = Path(workflow.basedir) / "src" / "neuron_embeddings"
sys.path.insert(0, str(SRC.parent))
# Light modules only (no torch): the Snakefile is parsed before every run and inside every cluster job.
from neuron_embeddings.checks import (
    check_config,
    config_warnings,
    model_entries,
    scheduler_warning,
    selection_passes,
    threshold_for,
    tokenizer_key,
    validate_config,
)
from neuron_embeddings.codehash import code_hash
from neuron_embeddings.errors import PipelineError
import snakemake

if warning := scheduler_warning(snakemake.__version__):
    print(warning, file=sys.stderr)


def startup_checks(check, *args, **kwargs):
    """Errors worth catching before any job starts: one line naming the config file, the key and the value."""
    try:
        check(*args, **kwargs)
    except PipelineError as exc:
        files = ", ".join(str(Path(f).name) for f in getattr(workflow, "configfiles", []) or []) or "config"
        raise WorkflowError(f"{files}: {exc}") from None


startup_checks(validate_config, config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml")  # passes now; fills in the schema's defaults


def sorted_keys(value):
    """The config with every mapping's keys in sorted order. Snakemake compares a rule's params by their repr, so
    the same settings written in another key order (or with a default written out) would otherwise rerun
    everything from the corpus on."""
    if isinstance(value, dict):
        return {key: sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [sorted_keys(item) for item in value]
    return value


_sorted_config = sorted_keys(config)
config.clear()
config.update(_sorted_config)

RUN = f"results/{config['run']}"
SHARDS = [f"{i:03d}" for i in range(config["corpus"]["n_shards"])]
ENV = "../../envs/pipeline.yaml"

# The run's models. The stages from the model to the metrics take a `run` wildcard: the reference model's outputs
# are under results/<run>/, every other model's under results/<run>/models/<name>/. The analyses, the explorer,
# the SAE and the report are the reference model's.
MODELS = []
startup_checks(lambda: MODELS.extend(model_entries(config)))
ENTRY = {
    config["run"] if index == 0 else f"{config['run']}/models/{entry['name']}": entry
    for index, entry in enumerate(MODELS)
}
RUN_OF = {entry["name"]: run for run, entry in ENTRY.items()}
config["model"] = {k: v for k, v in MODELS[0].items() if k not in ("name", "layers")}  # the reference model
LAYERS = MODELS[0]["layers"]
MODEL_DIR = f"{RUN}/model"
CORPUS_SHARDS = expand(f"{RUN}/corpus/shard-{{shard}}.parquet", shard=SHARDS)
DOCUMENTS = f"{RUN}/corpus/documents.parquet"
CORPUS_OF = {
    run: next(r for r, e in ENTRY.items() if tokenizer_key(e) == tokenizer_key(entry)) for run, entry in ENTRY.items()
}
CORPUS_OWNERS = "|".join(re.escape(run) for run in sorted(set(CORPUS_OF.values())))


wildcard_constraints:
    run="|".join(re.escape(run) for run in ENTRY),


startup_checks(
    check_config, config, prepared_models={entry["name"]: f"results/{run}/model" for run, entry in ENTRY.items()}
)
for warning in config_warnings(config):
    print(warning, file=sys.stderr)


def model_settings(entry):
    """What prepare_model reads of a model entry (its name and layers are the workflow's business)."""
    return {k: v for k, v in entry.items() if k not in ("name", "layers")}


def trusts_remote_code(wildcards):
    return bool(ENTRY[wildcards.run]["trust_remote_code"])


def corpus_shard(wildcards):
    return f"results/{CORPUS_OF[wildcards.run]}/corpus/shard-{wildcards.shard}.parquet"


def corpus_shards(wildcards):
    return expand(f"results/{CORPUS_OF[wildcards.run]}/corpus/shard-{{shard}}.parquet", shard=SHARDS)


def script_code(script):
    """Hash of a rule's script and the package modules it imports (codehash.py), passed as a param: editing a
    module reruns exactly the stages that run it, and what follows. Comments and docstrings rerun nothing."""
    return code_hash(Path(workflow.basedir) / "workflow" / "rules" / script, SRC)


def corpus_files():
    """The local files of the corpus (path sources), as inputs: editing, adding or removing one reruns the corpus
    and everything after it. Builtin and hub corpora are pinned by their config (params) alone."""
    files = []
    for source in config["corpus"]["sources"]:
        if "path" in source:
            pattern = os.path.expanduser(str(source["path"]))
            matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
            files += sorted(path for path in matches if os.path.isfile(path))
    return files


def local_model_folder(entry):
    """The folder of a local (non-GGUF) model source, or None."""
    from neuron_embeddings.sources import ModelSource, resolve

    folder, gguf = resolve(ModelSource.from_config(entry))
    return folder if os.path.isdir(folder) and not gguf else None


def model_files(entry):
    """The files of a local model (folder or GGUF), as inputs: replacing the weights in place reruns everything.
    A hub id is pinned by model.revision (params) instead."""
    from neuron_embeddings.sources import ModelSource, resolve

    folder, gguf = resolve(ModelSource.from_config(entry))
    if not os.path.isdir(folder):
        return []
    if gguf:
        return [os.path.join(folder, gguf)]
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def all_targets():
    return [
        f"{RUN}/report/index.html",
        f"{RUN}/metrics/summary.json",
        *expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
        *expand(f"{RUN}/report/layer-{{layer}}.png", layer=LAYERS),
        f"{RUN}/report/summary.tsv",
        f"{RUN}/explorer",
        *sae_targets(),  # workflow/rules/sae.smk: SAE latents against the neurons (config key sae)
        *comparison_targets(),  # workflow/rules/comparison.smk: every model of the run side by side
        *export_targets(RUN, LAYERS, config["export"]),  # workflow/rules/export.smk: other tools' formats
    ]


def comparison_targets():
    if len(MODELS) < 2:
        return []
    return [f"{RUN}/comparison/comparison.json", f"{RUN}/comparison/index.html"]


SELECTION = config["selection"]
SELECTION_MODE = SELECTION["mode"]
# The threshold mode's pass 1 (activation_stats, merge_stats) runs only when it takes two passes.
TWO_PASSES = SELECTION_MODE == "threshold" and selection_passes(SELECTION) == 2


def cache_selection_params():
    """Only the selection settings the active mode uses, so changing another mode's keys reruns nothing."""
    common = {
        "mode": SELECTION_MODE,
        "sign": SELECTION["sign"],
        "context_before": SELECTION["context_before"],
        "context_after": SELECTION["context_after"],
    }
    if SELECTION_MODE == "top_k":
        return {**common, "top_k": SELECTION["top_k"]}
    quantiles = SELECTION["quantiles"]
    return {
        **common,
        "alpha": SELECTION["alpha"],
        "cap": SELECTION["cap"],
        "seed": SELECTION["seed"],
        "passes": selection_passes(SELECTION),
        "quantile_bins": quantiles["bins"],
        "quantile_per_bin": quantiles["per_bin"],
    }


def sae_selection_params():
    """The latents' selection: the neurons' settings but their sign (ReLU and TopK latents are never negative)."""
    return {key: value for key, value in cache_selection_params().items() if key != "sign"}


def selection_k():
    return SELECTION["top_k"] if SELECTION_MODE == "top_k" else SELECTION["cap"]


def compute_params():
    act = config["activations"]
    return {
        "batch_size": act["batch_size"],
        "device": act["device"],
        "dtype": act["dtype"],
        "store_dtype": act["store_dtype"],
        "histogram_stride": act["histogram_stride"],
    }


def metric_settings():
    """What the metrics stage needs beyond its inputs (the clustering's own settings travel in its Parquet)."""
    stability = config["metrics"]["stability"]
    return {
        "min_examples": config["metrics"]["min_examples"],
        "resamples": stability["resamples"],
        "fraction": stability["fraction"],
        "seed": stability["seed"],
    }


# The analyses and the explorer (workflow/rules/analyses.smk, explorer.smk).
ANALYSES = config["analyses"]
EXPLORER = config["explorer"]


def importance_settings():
    """What token importance computes, and where: only the examples the explorer shows."""
    imp = ANALYSES["importance"]
    return {
        "neurons": imp["neurons"],
        "examples_per_cluster": imp["examples_per_cluster"],
        "max_clusters": EXPLORER["max_clusters"],
        "batch_size": imp["batch_size"],
        "device": config["activations"]["device"],
        "dtype": config["activations"]["dtype"],
    }


# Cache groups: the layers that one forward pass per shard serves, named by their layers (layers-2-10). A
# layer that an existing group (a folder under activations/ or stats/, even one a killed run left half done)
# was made for stays in that group; the new layers of a run form one group of their own. So adding a layer runs
# one more pass per shard, for the new layers only, and never reruns the caches, or anything downstream, of the
# layers already there.
CACHE_TREES = ("activations", "stats")


def group_layers(group):
    return [int(layer) for layer in group.split("-")[1:]]


def _assign_cache_groups(run_dir, layers):
    existing = {
        Path(path).name
        for tree in CACHE_TREES
        for path in glob.glob(f"{run_dir}/{tree}/layers-*")
        if re.fullmatch(r"layers(-\d+)+", Path(path).name)
    }

    def completeness(group, layer):  # caches of this layer, then shards, the group already has
        files = sum(
            len(glob.glob(f"{run_dir}/{tree}/{group}/shard-*/layer-{layer}.safetensors")) for tree in CACHE_TREES
        )
        shards = sum(len(glob.glob(f"{run_dir}/{tree}/{group}/shard-*")) for tree in CACHE_TREES)
        return files, shards

    groups = {}
    for layer in layers:
        holders = sorted(group for group in existing if layer in group_layers(group))
        if holders:
            groups[layer] = max(holders, key=lambda group: completeness(group, layer))  # ties: by name
    new = [layer for layer in layers if layer not in groups]
    groups.update({layer: "layers-" + "-".join(map(str, new)) for layer in new})
    return groups


CACHE_GROUP = {run: _assign_cache_groups(f"results/{run}", entry["layers"]) for run, entry in ENTRY.items()}


def layer_caches(tree, run, layer):
    """The per-shard folders that hold one layer's caches (tree "activations") or pass-1 statistics ("stats")."""
    return expand(f"results/{run}/{tree}/{CACHE_GROUP[run][int(layer)]}/shard-{{shard}}", shard=SHARDS)


def _cached_top_k(folder):
    """The top_k a finished cache folder holds (from a safetensors header, without loading it), or 0."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("layer-*.safetensors")):
        try:
            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata() or {}
            settings = json.loads(meta.get("provenance", "{}")).get("settings", {})
            if settings.get("mode", "top_k") == "top_k":
                return int(settings.get("top_k", 0))
        except (OSError, ValueError, SafetensorError):
            pass
    return 0


def cache_selection(wildcards):
    """The selection settings the caching applies. In top_k mode a shard already cached deeper than top_k keeps
    its depth: the merge takes the same canonical top-k from it, so lowering top_k reruns the selection and
    what follows, never the caching."""
    params = cache_selection_params()
    if SELECTION_MODE == "top_k":
        cached = _cached_top_k(f"results/{wildcards.run}/activations/{wildcards.group}/shard-{wildcards.shard}")
        params = {**params, "top_k": max(params["top_k"], cached)}
    return params


def group_stats(wildcards):
    if not TWO_PASSES:
        return []
    return [f"results/{wildcards.run}/stats/layer-{layer}.safetensors" for layer in group_layers(wildcards.group)]


# SAE latents as units (workflow/rules/sae.smk; config key sae). sae/config.py is light: no torch at parse time.
from neuron_embeddings.sae.config import check_sae_config, sae_specs

startup_checks(check_sae_config, config)
SAE = config["sae"]
SAES = sae_specs(config)
SAE_NAMES = list(SAES)
SAE_DIR = f"{RUN}/sae"


def sae_names_regex(kind):
    """The names of one kind of SAE, as a wildcard constraint (one that matches nothing when there are none)."""
    names = [re.escape(name) for name, spec in SAES.items() if spec["kind"] == kind]
    return "|".join(names) if names else "(?!)"


def sae_layer(wildcards):
    return SAES[wildcards.sae]["layer"]


def sae_targets():
    """What `all` asks for: per SAE its quality figures and the comparison with its layer's neurons."""
    return [
        path
        for name in SAE_NAMES
        for path in (
            f"{SAE_DIR}/{name}/quality.json",
            f"{SAE_DIR}/{name}/comparison.json",
            f"{RUN}/report/sae-{name}.png",
        )
    ]


def sae_report_inputs():
    """The report's SAE section: per SAE its comparison JSON, then its plot."""
    return [
        path for name in SAE_NAMES for path in (f"{SAE_DIR}/{name}/comparison.json", f"{RUN}/report/sae-{name}.png")
    ]


def sae_training_settings(wildcards):
    """Every setting of training.TrainSettings (sae_specs: the entry's, sae.training's and eval_tokens)."""
    return SAES[wildcards.sae]["train"]


# Memory each job declares (mem_mb, and gpu_mem_mb for the GPU rules), from the prepared model's manifest: so a
# SLURM run asks for what the job needs. Before prepare_model has run, the functions raise FileNotFoundError on
# their model input, which Snakemake turns into <TBD> and evaluates again once the model is there.
from neuron_embeddings import memory


def _prepared_shape(input):
    model_dir = input.model
    if not (Path(model_dir) / "neuron_embeddings.json").is_file():
        raise FileNotFoundError(2, "the model is not prepared yet", model_dir)
    return memory.model_shape(model_dir, None)


def _batch_tokens():
    batch = config["activations"]["batch_size"]
    return (16 if batch == "auto" else int(batch)) * config["corpus"]["window_tokens"]


def _shard_tokens(input):
    """At most this many tokens in the job's shard (its windows x window_tokens, from the Parquet footer): the x
    rows a caching job keeps are bounded by it as well as by neurons x examples."""
    import pyarrow.parquet as pq

    if not os.path.isfile(input.shard):
        raise FileNotFoundError(2, "the corpus is not tokenized yet", input.shard)
    return pq.ParquetFile(input.shard).metadata.num_rows * config["corpus"]["window_tokens"]


def _examples_per_neuron():
    quantiles = SELECTION["quantiles"]
    return selection_k() + quantiles["bins"] * quantiles["per_bin"]


def _cached_per_neuron(input):
    """Entries a caching job holds per neuron: the one-pass selection's candidates outnumber the final cap."""
    if SELECTION_MODE == "threshold" and not TWO_PASSES:
        return memory.one_pass_candidates(SELECTION["cap"], _shard_tokens(input))
    return _examples_per_neuron()


def caching_mem_mb(wildcards, input, attempt):
    layers = group_layers(wildcards.group)
    return attempt * memory.caching_mb(
        _prepared_shape(input),
        deepest_layer=max(layers),
        cached_layers=len(layers),
        examples=_cached_per_neuron(input),
        batch_tokens=_batch_tokens(),
        shard_tokens=_shard_tokens(input),
        store_dtype=config["activations"]["store_dtype"],
    )


def caching_gpu_mem_mb(wildcards, input):
    layers = group_layers(wildcards.group)
    return memory.gpu_mb(
        _prepared_shape(input), max(layers), config["activations"]["dtype"], _batch_tokens(), len(layers)
    )


def embedding_mem_mb(wildcards, input, attempt):
    return attempt * memory.embedding_mb(_prepared_shape(input), _examples_per_neuron())


def remake_mem_mb(wildcards, input, attempt):
    """Clustering, metrics and the sweep: the selection and the embedding weights they remake the embeddings from."""
    return attempt * memory.remake_mb(input.selection, input.embedding_weights)


def _deepest_layer(wildcards):
    if "layer" in wildcards.keys():
        return int(wildcards.layer)
    if "sae" in wildcards.keys():
        return int(SAES[wildcards.sae]["layer"])
    return max([spec["layer"] for spec in SAES.values()] or LAYERS)


def layer_model_mem_mb(wildcards, input, attempt):
    """A job that runs the model up to one layer (token importance, SAE training and caching)."""
    layer = _deepest_layer(wildcards)
    cap = config["corpus"]["max_tokens"]
    return attempt * memory.caching_mb(
        _prepared_shape(input),
        deepest_layer=layer,
        cached_layers=1,
        examples=_examples_per_neuron(),
        batch_tokens=_batch_tokens(),
        shard_tokens=int(cap) if cap else None,
    )


def whole_model_mem_mb(wildcards, input, attempt):
    return attempt * memory.whole_model_mb(_prepared_shape(input))
