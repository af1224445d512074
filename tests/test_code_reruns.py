"""Reruns that follow the code: editing one package module reruns exactly the stages that run it, and what follows.

Each rule's params hold a hash of its script and the package modules the script imports (codehash.py). Here a
scratch copy of the workflow and package plans the session's finished tiny run (conftest.reference_run) after an
edit to one module at a time, and the planned rules must be exactly the ones in RERUNS. A module added to the
package must be added to RERUNS too (test_every_module_is_listed), so the table stays the documented answer to
"what does an edit here rerun?".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, plan_with_edit, scratch_copy
from neuron_embeddings.codehash import imported_modules, module_name

pytestmark = pytest.mark.slow

PACKAGE = REPO / "src" / "neuron_embeddings"

# The reference run's rules, in the order data flows, and what follows each.
MODEL = {"prepare_model"}
CORPUS = {"tokenize_corpus"}
CACHING = {"cache_activations"}  # top_k mode: no pass-1 statistics
SELECTION = {"select_examples"}
EMBEDDING = {"embed_neurons"}
CLUSTERING = {"cluster_features"}
METRICS = {"neuron_metrics", "summarize_run"}
IMPORTANCE = {"token_importance"}
SIMILAR = {"similar_features"}
SWEEP = {"threshold_sweep"}
FIGURES = {"analysis_figures"}
REPORT = {"report"}
EXPLORER = {"explorer"}
ALL = {"all"}

AFTER_METRICS = METRICS | IMPORTANCE | FIGURES | REPORT | EXPLORER | ALL
AFTER_CLUSTERING = CLUSTERING | AFTER_METRICS | SIMILAR  # the sweep reclusters the embeddings itself
AFTER_EMBEDDING = EMBEDDING | AFTER_CLUSTERING | SWEEP
AFTER_SELECTION = SELECTION | AFTER_EMBEDDING
AFTER_CACHING = CACHING | AFTER_SELECTION
EVERYTHING = MODEL | CORPUS | AFTER_CACHING

# module -> the rules its edit reruns in the reference run (one model, no SAE: those stages are not planned).
RERUNS = {
    "neuron_embeddings": EVERYTHING,
    "neuron_embeddings.errors": EVERYTHING,
    "neuron_embeddings.runner": EVERYTHING,
    "neuron_embeddings.storage": EVERYTHING,
    "neuron_embeddings.adapters": EVERYTHING,
    "neuron_embeddings.models": EVERYTHING,
    "neuron_embeddings.sources": EVERYTHING,
    "neuron_embeddings.vocab": EVERYTHING,  # prepare_model writes the token texts
    "neuron_embeddings.schemas": CORPUS | AFTER_CACHING,
    "neuron_embeddings.corpus": CORPUS | AFTER_CACHING,
    "neuron_embeddings.activations": AFTER_CACHING,
    "neuron_embeddings.topk": AFTER_CACHING,
    "neuron_embeddings.selection": AFTER_SELECTION,
    "neuron_embeddings.embeddings": AFTER_EMBEDDING,
    "neuron_embeddings.tables": AFTER_EMBEDDING,
    "neuron_embeddings.similar": SIMILAR | FIGURES | EXPLORER | ALL,
    "neuron_embeddings.clustering": AFTER_CLUSTERING | SWEEP,
    "neuron_embeddings.metrics": AFTER_METRICS | SWEEP,
    "neuron_embeddings.sweep": SWEEP | FIGURES | EXPLORER | ALL,
    "neuron_embeddings.figures": FIGURES | SWEEP | REPORT | EXPLORER | ALL,
    "neuron_embeddings.importance": IMPORTANCE | FIGURES | EXPLORER | ALL,
    "neuron_embeddings.explorer": EXPLORER | ALL,
    "neuron_embeddings.report": REPORT | ALL,
    "neuron_embeddings.pages": REPORT | ALL,  # the pages' shared template base (the comparison and toy pages too)
    # What no stage of the reference run executes: planning, the command line, other workflows and stages.
    "neuron_embeddings.codehash": set(),
    "neuron_embeddings.checks": set(),
    "neuron_embeddings.memory": set(),
    "neuron_embeddings.estimate": set(),
    "neuron_embeddings.cli": set(),
    "neuron_embeddings.compare": set(),
    "neuron_embeddings.toy": set(),
    "neuron_embeddings.toy_report": set(),
    **{  # the exports are off in the reference run
        f"neuron_embeddings.export{module}": set()
        for module in ("", ".common", ".delphi", ".delphi_explain", ".neuronpedia", ".run", ".sql")
    },
    **{
        f"neuron_embeddings.sae{module}": set()
        for module in ("", ".config", ".model", ".saelens_io", ".streaming", ".training", ".latents", ".embedding",
                       ".evaluation", ".comparison", ".plots")
    },
}


def package_modules() -> list[str]:
    return sorted(module_name(path, PACKAGE) for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_every_module_is_listed():
    assert set(package_modules()) == set(RERUNS)


def test_comments_docstrings_and_formatting_rerun_nothing(reference_run, tmp_path):
    copy = scratch_copy(tmp_path / "repo")
    clustering = "neuron_embeddings.clustering"
    assert plan_with_edit(reference_run, copy, clustering, lambda text: text + "\n# a comment\n") == set()
    assert plan_with_edit(reference_run, copy, clustering, lambda text: '"""Edited."""\n' + text.split('"""', 2)[2]) == set()
    assert plan_with_edit(reference_run, copy, clustering, lambda text: text.replace("\n\n\ndef ", "\n\n\n\ndef ")) == set()
    # ...while a change of code does.
    assert plan_with_edit(reference_run, copy, clustering, lambda text: text + "\nX = 1\n") == RERUNS[clustering]


def test_each_module_edit_reruns_exactly_its_stages(reference_run, tmp_path):
    """Dry runs two at a time, each on its own scratch copy (dry runs take no lock: --nolock).

    The modules that must rerun nothing are edited all at once, in one dry run: editing more modules can only
    change more rules' code hashes, so if that plan is empty, so is each module's own."""
    copies = [scratch_copy(tmp_path / f"repo-{i}") for i in range(3)]  # the third for the inert modules
    modules = package_modules()
    inert = [m for m in modules if RERUNS.get(m) == set()]
    modules = [m for m in modules if m not in inert]

    def edit(text: str) -> str:
        return text + "\n_RERUN_PROBE = 1\n"  # code, not a comment: the syntax tree changes

    def plan(index: int) -> list[tuple[str, set[str]]]:
        return [(m, plan_with_edit(reference_run, copies[index], m, edit)) for m in modules[index::2]]

    with ThreadPoolExecutor(2) as pool:
        together = pool.submit(plan_with_edit, reference_run, copies[2], inert, edit)
        planned = dict(pair for part in pool.map(plan, range(2)) for pair in part)
    assert together.result() == set(), f"editing {inert} at once plans {sorted(together.result())}"
    expected = {m: RERUNS.get(m, {"<not listed in RERUNS>"}) for m in modules}
    wrong = {m: (sorted(planned[m] - expected[m]), sorted(expected[m] - planned[m])) for m in modules if planned[m] != expected[m]}
    assert not wrong, "module: (planned but not expected, expected but not planned)\n" + "\n".join(
        f"{m}: {extra} {missing}" for m, (extra, missing) in wrong.items())


def test_a_script_imports_only_what_it_runs():
    """The import graph is the rerun graph: a stage never imports a later stage's module."""
    scripts = REPO / "workflow" / "scripts"
    runs = {script.stem: set(imported_modules(script, PACKAGE)) for script in scripts.glob("*.py")}
    upstream_only = {
        "prepare_model": {"report", "metrics", "clustering", "schemas", "figures"},
        "tokenize_corpus": {"models", "adapters", "activations", "report", "metrics"},
        "cache_activations": {"embeddings", "clustering", "metrics", "report", "figures"},
        "token_importance": {"figures", "report", "explorer", "sweep"},
        "cluster_features": {"models", "adapters", "embeddings", "metrics", "figures"},
        "neuron_metrics": {"report", "figures", "sweep", "explorer"},
        "compare_models": {"report", "explorer"},
    }
    for script, forbidden in upstream_only.items():
        assert not {f"neuron_embeddings.{m}" for m in forbidden} & runs[script], script
