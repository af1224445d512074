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
    for name in sorted(set(modules) | {"storage", "schemas", "errors", "runner"}):
        digest.update((SRC / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def shard_caches(layer):
    return expand(f"{RUN}/activations/shard-{{shard}}/layer-{layer}.safetensors", shard=SHARDS)


def all_targets():
    return [
        f"{RUN}/report/index.html",
        f"{RUN}/metrics/summary.json",
        *expand(f"{RUN}/metrics/layer-{{layer}}.parquet", layer=LAYERS),
    ]
