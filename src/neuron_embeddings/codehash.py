"""Which package code a workflow script runs, as one hash: the rules pass it as a param, so that editing a module
reruns exactly the stages that execute it (and what follows), and nothing else.

A script's code is the script and every package module it imports, directly or through other package modules,
lazy imports inside functions included: an import is what decides which code a stage can run. Each file is
hashed by its syntax tree without docstrings, so comments, docstrings and formatting rerun nothing. Files a
module reads at run time live in a folder named `<module>_assets` beside it (the explorer's scripts, the
report's templates) and count as part of that module.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "neuron_embeddings"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of a dotted module name of the package (`neuron_embeddings.sae.training`), or None."""
    parts = name.split(".")
    if parts[0] != package_dir.name:
        return None
    base = package_dir.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    relative = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str | None, package_dir: Path) -> set[str]:
    """The dotted package-module names a file imports; `name` is the file's own module name (None for a script)."""
    tree = ast.parse(path.read_text(), str(path))
    here = name.split(".") if name else []
    if name is not None and path.name != "__init__.py":
        here = here[:-1]  # a plain module's relative imports start from its package
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from pkg import module`
    modules = set()
    for dotted in found:
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            if module_file(".".join(parts[:i]), package_dir) is not None:
                modules.add(".".join(parts[:i]))
    return modules


def imported_modules(script: Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every package module a script runs when imported, sorted."""
    seen: set[str] = set()
    todo = sorted(_imports(Path(script), None, package_dir))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, package_dir)
        assert path is not None
        todo += sorted(_imports(path, name, package_dir) - seen)
    return sorted(seen)


@lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int) -> bytes:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).digest()


def _assets(path: Path) -> list[Path]:
    folder = path.parent / f"{path.stem}_assets"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def code_hash(script: str | Path, package_dir: Path = PACKAGE_DIR) -> str:
    """The hash of a script and the package code it runs (16 hex digits)."""
    script = Path(script)
    digest = hashlib.sha256(_file_digest(script, script.stat().st_mtime_ns))
    for name in imported_modules(script, package_dir):
        path = module_file(name, package_dir)
        assert path is not None
        digest.update(name.encode() + _file_digest(path, path.stat().st_mtime_ns))
        for asset in _assets(path):
            digest.update(str(asset.relative_to(package_dir)).encode() + asset.read_bytes())
    return digest.hexdigest()[:16]
