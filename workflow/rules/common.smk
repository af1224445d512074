# What every stage shares: config validation, output paths, and the code versions that trigger reruns.
import hashlib
from pathlib import Path

from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

SRC = Path(workflow.basedir) / "src" / "neuron_embeddings"
RUN = f"results/{config['run']}"
LAYERS = sorted(config["layers"])
SHARDS = [f"{i:03d}" for i in range(config["corpus"]["n_shards"])]
ENV = "../../envs/pipeline.yaml"


def startup_checks():
    """Errors worth catching before any job starts, each a single line naming the key."""
    import sys

    sys.path.insert(0, str(SRC.parent))
    from neuron_embeddings.checks import check_config
    from neuron_embeddings.errors import PipelineError

    try:
        check_config(config, prepared_model=f"{RUN}/model")
    except PipelineError as exc:
        raise WorkflowError(f"config.yaml: {exc}") from None


startup_checks()
from neuron_embeddings.clustering import threshold_for


def code_version(*modules):
    """Hash of the package modules behind a stage, passed as a param: editing one reruns that stage and after."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        digest.update((SRC / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def shard_caches(layer):
    return expand(f"{RUN}/activations/shard-{{shard}}/layer-{layer}.safetensors", shard=SHARDS)


def all_targets():
    return [
        f"{RUN}/report/index.html",
        f"{RUN}/metrics/summary.json",
        *expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
        *expand(f"{RUN}/report/layer-{{layer}}.png", layer=LAYERS),
        f"{RUN}/report/summary.tsv",
        f"{RUN}/explorer",
    ]


SELECTION = config["selection"]
SELECTION_MODE = SELECTION.get("mode", "top_k")


def cache_selection_params():
    """Only the selection settings the active mode uses, so changing another mode's keys reruns nothing."""
    common = {
        "mode": SELECTION_MODE,
        "context_before": SELECTION.get("context_before", 20),
        "context_after": SELECTION.get("context_after", 10),
    }
    if SELECTION_MODE == "top_k":
        return {**common, "top_k": SELECTION["top_k"]}
    quantiles = SELECTION.get("quantiles") or {}
    return {
        **common,
        "alpha": SELECTION.get("alpha", 0.75),
        "cap": SELECTION.get("cap", 200),
        "seed": SELECTION.get("seed", 0),
        "quantile_bins": quantiles.get("bins", 0),
        "quantile_per_bin": quantiles.get("per_bin", 0),
    }


def selection_k():
    return SELECTION["top_k"] if SELECTION_MODE == "top_k" else SELECTION.get("cap", 200)


def compute_params():
    act = config["activations"]
    return {
        "batch_size": act.get("batch_size", 16),
        "device": act.get("device", "auto"),
        "dtype": act.get("dtype", "float32"),
        "store_dtype": act.get("store_dtype", "float32"),
        "histogram_stride": act.get("histogram_stride", 8),
    }


def merged_stats_inputs():
    if SELECTION_MODE != "threshold":
        return []
    return expand(f"{RUN}/stats/layer-{{layer}}.safetensors", layer=LAYERS)
