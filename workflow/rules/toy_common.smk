# What the toy workflow's rules share: config validation, the grid, and the code versions that trigger reruns.
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/toy.schema.yaml")

sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))
from neuron_embeddings.codehash import code_hash

TOY_RUN = f"results/{config['run']}"
TOY_ENV = "../../envs/pipeline.yaml"
TOY_GRID = [
    (int(dim), f"{float(s):.3f}", int(seed))
    for dim in config["input_dims"]
    for s in config["sparsities"]
    for seed in config["seeds"]
]


def script_code(script):
    """Hash of a rule's script and the package modules it imports (codehash.py): editing one reruns the stage."""
    return code_hash(
        Path(workflow.basedir) / "rules" / script, Path(workflow.basedir).parent / "src" / "neuron_embeddings"
    )


def toy_scores():
    return [f"{TOY_RUN}/scores/input-{dim}/sparsity-{s}/seed-{seed}.parquet" for dim, s, seed in TOY_GRID]


def toy_targets():
    return [f"{TOY_RUN}/report/index.html", f"{TOY_RUN}/recovery.parquet", f"{TOY_RUN}/choice.json"]
