# What the toy workflow's rules share: config validation, the grid, and the code versions that trigger reruns.
import ast
import hashlib
from pathlib import Path

from snakemake.utils import validate


validate(config, schema="../schemas/toy.schema.yaml")

TOY_SRC = Path(workflow.basedir).parent / "src" / "neuron_embeddings"
TOY_RUN = f"results/{config['run']}"
TOY_ENV = "../../envs/pipeline.yaml"
TOY_GRID = [
    (int(dim), f"{float(s):.3f}", int(seed))
    for dim in config["input_dims"]
    for s in config["sparsities"]
    for seed in config["seeds"]
]


def toy_code_version(*modules):
    """Hash of the package modules behind a stage and every package module they import; editing one reruns it."""
    seen, todo, digest = set(), list(modules), hashlib.sha256()
    while todo:
        name = todo.pop()
        path = TOY_SRC / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
    for name in sorted(seen):
        digest.update(name.encode() + (TOY_SRC / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def toy_scores():
    return [f"{TOY_RUN}/scores/input-{dim}/sparsity-{s}/seed-{seed}.parquet" for dim, s, seed in TOY_GRID]


def toy_targets():
    return [f"{TOY_RUN}/report/index.html", f"{TOY_RUN}/recovery.parquet", f"{TOY_RUN}/choice.json"]
