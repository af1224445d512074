"""The exports (workflow/rules/export.smk, neuron_embeddings.export): one real Snakemake run with every format
switched on, then each format read back the way its tool reads it: delphi's latent cache through delphi's own
loader when delphi imports (else a re-implementation of its checks), Neuronpedia's records against JSON schemas
of SAEDashboard's fields, and every SQL block of docs/exports.md through DuckDB."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from conftest import REPO, copy_run, planned_jobs, run_snakemake

from neuron_embeddings import cli
from neuron_embeddings.errors import PipelineError
from neuron_embeddings.export.common import atomic_dir, json_line
from neuron_embeddings.export.delphi import FIRING, hookpoints, split_bounds
from neuron_embeddings.export.neuronpedia import record_schema
from neuron_embeddings.export.run import schema_defaults

pytestmark = pytest.mark.slow

EXPORT_RULES = {"export_delphi", "export_neuronpedia", "export_duckdb"}


def export_targets(run: str, layers: list[int]) -> list[str]:
    return [
        *(f"results/{run}/export/{fmt}/layer-{layer}" for fmt in ("delphi", "neuronpedia") for layer in layers),
        f"results/{run}/export/duckdb/views.sql",
    ]


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory):
    """A copy of the reference run with every export switched on, built by Snakemake (export jobs only)."""
    src, config = reference_run
    workdir = copy_run(src, tmp_path_factory.mktemp("export") / "run")
    config = {**config, "export": {"delphi": True, "neuronpedia": True, "duckdb": True, "delphi_splits": 3}}
    targets = export_targets(config["run"], config["layers"])
    dry = run_snakemake(workdir, config, "-n", *targets)
    assert planned_jobs(dry) == {"export_delphi": 2, "export_neuronpedia": 2, "export_duckdb": 1}
    proc = run_snakemake(workdir, config, *targets)
    assert set(planned_jobs(proc)) <= EXPORT_RULES
    return workdir, config


def run_dir(exported) -> Path:
    workdir, config = exported
    return workdir / "results" / config["run"]


def test_defaults_are_off_and_all_asks_for_nothing(reference_run):
    defaults = schema_defaults()
    assert (defaults["delphi"], defaults["neuronpedia"], defaults["duckdb"]) == (False, False, False)
    workdir, config = reference_run
    assert not EXPORT_RULES & set(planned_jobs(run_snakemake(workdir, config, "-n")))


def test_all_asks_for_switched_on_exports(exported):
    workdir, config = exported
    dry = run_snakemake(workdir, {**config, "export": {"duckdb": True}}, "-n")
    assert not EXPORT_RULES & set(planned_jobs(dry))  # built already; the other formats' settings do not touch it
    dry = run_snakemake(workdir, {**config, "export": {"neuronpedia": True, "neuronpedia_source_set": "other"}}, "-n")
    assert {rule: n for rule, n in planned_jobs(dry).items() if rule in EXPORT_RULES} == {"export_neuronpedia": 2}


def test_sizes_and_times(exported):
    """Size and time per layer (the figures of docs/exports.md), from the rules' benchmark files."""
    root = run_dir(exported)
    for rule in ("export_delphi", "export_neuronpedia"):
        for bench in sorted((root / "benchmarks" / rule).glob("layer-*.tsv")):
            seconds = float(next(csv.DictReader(bench.open(), delimiter="\t"))["s"])
            fmt = rule.split("_")[1]
            size = sum(p.stat().st_size for p in (root / "export" / fmt / bench.stem).rglob("*") if p.is_file())
            print(f"{rule} {bench.stem}: {seconds:.2f} s (job), {size / 1000:.1f} kB")
            assert size > 0


# delphi -----------------------------------------------------------------------------------------------------------

try:  # delphi's own loader, when it imports (eai-delphi needs vLLM and more; the test does not require it)
    from delphi.latents.loader import TensorBuffer as DelphiTensorBuffer
except Exception:  # noqa: BLE001 - any import failure means "not available"
    DelphiTensorBuffer = None


def load_shard(path: Path, module: str):
    """Locations (absolute latent index), activations and tokens of one shard, as delphi reads them: with delphi's
    TensorBuffer.load when delphi imports, else by its rules (latents/loader.py): the start latent from the file
    name added to column 2, locations of an integer dtype its to_int64_tensor accepts, tokens cast to int64."""
    if DelphiTensorBuffer is not None:
        locations, activations, tokens = DelphiTensorBuffer(str(path), module).load()
        return locations.numpy(), activations.float().numpy(), tokens.numpy()
    data = load_file(str(path))
    assert data["locations"].dtype in (np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64)
    first = int(str(path).split("/")[-1].split("_")[0])
    locations = data["locations"].astype(np.int64)
    locations[:, 2] += first
    return locations, data["activations"].astype(np.float32), data["tokens"].astype(np.int64)


def test_delphi_cache_round_trip(exported):
    workdir, config = exported
    root = run_dir(exported)
    corpus = pq.read_table(sorted((root / "corpus").glob("shard-*.parquet")))
    window_ids = dict(zip(corpus.column("window").to_pylist(), corpus.column("input_ids").to_pylist()))
    print("delphi's loader:", "delphi.latents.loader.TensorBuffer" if DelphiTensorBuffer else "re-implemented checks")
    for layer in config["layers"]:
        folder = root / "export" / "delphi" / f"layer-{layer}"
        emb = pq.read_table(root / "embeddings" / f"layer-{layer}.parquet").drop_columns(["embedding"]).to_pylist()
        clusters = {(r["neuron"], r["example_rank"]): r for r in pq.read_table(root / "clusters" / f"layer-{layer}.parquet").to_pylist()}
        mapping = pq.read_table(folder / "cluster_latents.parquet").to_pylist()
        windows = pq.read_table(folder / "windows.parquet").to_pylist()
        T = config["corpus"]["window_tokens"]
        n_neurons = 48

        # Expected: per latent, (row, position) -> the oriented activation, where it fires.
        row_of = {w["window"]: w["row"] for w in windows}
        latent_of_cluster = {(m["neuron"], m["cluster"]): m["latent"] for m in mapping}
        expected = {"neurons": {}, "clusters": {}}
        for r in emb:
            window, pos = divmod(r["token_index"], T)
            sign = -1.0 if r["activation"] < 0 else 1.0
            cluster = clusters[(r["neuron"], r["example_rank"])]["cluster"]
            for j, value in enumerate(r["context_activations"]):
                value *= sign
                if value > FIRING:
                    key = (row_of[window], pos - r["context_center"] + j)
                    for kind, latent in (("neurons", r["neuron"]), ("clusters", latent_of_cluster.get((r["neuron"], cluster)))):
                        if latent is not None:
                            slot = expected[kind].setdefault(latent, {})
                            slot[key] = max(slot.get(key, -np.inf), value)
            # the token at the example's max token is the embeddings' token_id
            assert window_ids[window][pos] == r["token_id"]

        widths = {"neurons": n_neurons, "clusters": len(mapping)}
        all_tokens = None
        for kind, module in hookpoints(layer).items():
            hook = folder / "latents" / module
            cfg = json.loads((hook / "config.json").read_text())
            assert cfg["cache_ctx_len"] == T and cfg["model_name"] and cfg["n_splits"] == len(list(hook.glob("*.safetensors")))
            edges = sorted(tuple(map(int, p.stem.split("_"))) for p in hook.glob("*.safetensors"))
            assert edges == split_bounds(widths[kind], 3)
            got = {}
            for start, end in edges:
                raw = load_file(str(hook / f"{start}_{end}.safetensors"))
                assert raw["activations"].dtype == np.float16 and raw["locations"].dtype == np.uint16
                assert raw["locations"].ndim == 2 and raw["locations"].shape[1] == 3
                locations, activations, tokens = load_shard(hook / f"{start}_{end}.safetensors", module)
                assert ((locations[:, 2] >= start) & (locations[:, 2] <= end)).all()
                if all_tokens is None:
                    all_tokens = tokens
                np.testing.assert_array_equal(tokens, all_tokens)  # one tokens array for every shard of the layer
                for (row, pos, latent), value in zip(locations.tolist(), activations.tolist()):
                    assert (row, pos) not in got.setdefault(latent, {})
                    got[latent][(row, pos)] = value
            assert set(got) == set(expected[kind])
            for latent, slots in expected[kind].items():
                assert set(got[latent]) == set(slots)
                for key, value in slots.items():
                    assert got[latent][key] == pytest.approx(value, rel=2e-3, abs=1e-4)
        # the tokens are the corpus windows, padded past a window's end
        assert all_tokens.shape == (len(windows), T)
        for w in windows:
            ids = window_ids[w["window"]]
            assert all_tokens[w["row"], : len(ids)].tolist() == ids


@pytest.mark.skipif(DelphiTensorBuffer is None, reason="delphi (eai-delphi) does not import here")
def test_delphi_builds_records(exported):
    """delphi's LatentDataset, with its default constructor, makes explainer records of the cluster latents."""
    import torch
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents.loader import LatentDataset
    from transformers import AutoTokenizer

    workdir, config = exported
    root = run_dir(exported)
    layer = config["layers"][-1]
    modules = list(hookpoints(layer).values())
    dataset = LatentDataset(
        root / "export" / "delphi" / f"layer-{layer}" / "latents",
        SamplerConfig(n_examples_train=2, n_examples_test=1, n_quantiles=1, train_type="top"),
        ConstructorConfig(example_ctx_len=8, min_examples=2, n_non_activating=2),
        tokenizer=AutoTokenizer.from_pretrained(root / "model"), modules=modules,
        latents={module: torch.arange(48) for module in modules},
    )
    records = list(dataset)
    assert {str(r.latent).split("_latent")[0] for r in records} == set(modules)
    assert all(r.train and max(float(e.activations.max()) for e in r.train) > 0 for r in records)


def test_split_bounds_match_delphi():
    """delphi's _generate_split_indices: linspace edges, (start, end) with end included."""
    assert split_bounds(48, 3) == [(0, 15), (16, 31), (32, 47)]
    assert split_bounds(10, 3) == [(0, 2), (3, 5), (6, 9)]
    assert split_bounds(2, 5) == [(0, 0), (1, 1)]


# Neuronpedia ------------------------------------------------------------------------------------------------------

def visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def strict_json(line: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def test_neuronpedia_records_validate(exported):
    from jsonschema import Draft202012Validator, FormatChecker

    workdir, config = exported
    root = run_dir(exported)
    validators = {kind: Draft202012Validator(record_schema(kind), format_checker=FormatChecker())
                  for kind in ("release", "model", "sourceset", "source", "feature", "activation")}
    for layer in config["layers"]:
        base = root / "export" / "neuronpedia" / f"layer-{layer}"
        (model_dir,) = visible(base)  # Snakemake leaves a hidden timestamp file in a directory output
        (source,) = visible(model_dir)
        assert source.name == f"{layer}-mlp-neuron-embeddings"
        records = {}
        for name in ("release", "model", "sourceset", "source"):
            lines = (source / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == 1
            records[name] = strict_json(lines[0])
        for sub, kind in (("features", "feature"), ("activations", "activation")):
            records[sub] = []
            for path in sorted((source / sub).glob("batch-*.jsonl.gz")):
                with gzip.open(path, "rt", encoding="utf-8") as handle:
                    records[sub] += [strict_json(line) for line in handle]
        for name, found in records.items():
            kind = {"features": "feature", "activations": "activation"}.get(name, name)
            for record in found if isinstance(found, list) else [found]:
                errors = sorted(validators[kind].iter_errors(record), key=str)
                assert not errors, f"{name}: {errors[0].message}"
        assert records["source"]["id"] == source.name and records["model"]["id"] == model_dir.name
        assert records["model"]["neuronsPerLayer"] == 48

        emb = pq.read_table(root / "embeddings" / f"layer-{layer}.parquet").drop_columns(["embedding"]).to_pylist()
        features, activations = records["features"], records["activations"]
        assert [f["index"] for f in features] == [str(n) for n in range(48)]  # one feature per neuron
        assert len(activations) == len(emb) and len({a["id"] for a in activations}) == len(emb)
        by_id = {a["id"]: a for a in activations}
        examples = {(r["neuron"], r["example_rank"]): r for r in emb}
        clusters = pq.read_table(root / "clusters" / f"layer-{layer}.parquet").to_pylist()
        for feature in features:
            n = int(feature["index"])
            in_clusters = sorted((r["example_rank"], r["cluster"]) for r in clusters if r["neuron"] == n and r["cluster"] >= 0)
            carried = sorted((rank, c["cluster"]) for c in feature["clusters"] for rank in c["example_ranks"])
            assert carried == in_clusters
            for c in feature["clusters"]:
                assert c["size"] == len(c["example_ranks"]) == len(c["activation_ids"])
                for rank, aid in zip(c["example_ranks"], c["activation_ids"]):
                    record, example = by_id[aid], examples[(n, rank)]
                    assert record["index"] == feature["index"] and record["tokens"] == example["context_tokens"]
                    assert len(record["values"]) == len(record["tokens"])
                    assert record["qualifyingTokenIndex"] == example["context_center"]
                    sign = -1 if example["activation"] < 0 else 1
                    assert record["values"][example["context_center"]] == pytest.approx(abs(example["activation"]), abs=1e-3)
                    assert record["values"] == pytest.approx([sign * v for v in example["context_activations"]], abs=1e-3)
                    assert record["maxValue"] == max(record["values"])
                    assert record["values"][record["maxValueTokenIndex"]] == record["maxValue"]
            assert feature["polysemanticity"]["n_clusters"] == len(feature["clusters"])


def test_json_lines_are_strict_and_keep_corpus_text():
    """Corpus text is data: markup, quotes, NUL and line separators come back as the same text; no NaN in JSON."""
    text = 'x <script>window.pwned=1</script> "q" & </div>\u0000\u2028\n\t\ufffd'
    line = json_line({"tokens": [text], "value": 1.5})
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict_json(line) == {"tokens": [text], "value": 1.5}
    with pytest.raises(ValueError):
        json_line({"value": float("nan")})


# DuckDB -----------------------------------------------------------------------------------------------------------

def sql_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", markdown, flags=re.S)


def test_docs_sql_runs_on_a_finished_run(exported, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    workdir, config = exported
    root = run_dir(exported)
    blocks = sql_blocks((REPO / "docs" / "exports.md").read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(root)  # the docs' paths are relative to the run folder
    con = duckdb.connect()
    for block in blocks:
        con.execute(block)
        if block.lstrip().upper().startswith(("SELECT", "WITH")):
            assert con.fetchall(), f"no rows from:\n{block}"
    # the views file the rule wrote defines the same views, over the run's layers
    con = duckdb.connect()
    con.execute((root / "export" / "duckdb" / "views.sql").read_text())
    n_layers = len(config["layers"])
    assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 48 * n_layers
    n_examples = sum(pq.ParquetFile(root / "embeddings" / f"layer-{l}.parquet").metadata.num_rows for l in config["layers"])
    assert con.execute("SELECT count(*) FROM examples").fetchone()[0] == n_examples
    live = con.execute("SELECT count(*) FROM clusters WHERE is_central AND cluster >= 0").fetchone()[0]
    assert con.execute("SELECT count(*) FROM features").fetchone()[0] == live
    layers = [r[0] for r in con.execute("SELECT DISTINCT layer FROM embeddings ORDER BY layer").fetchall()]
    assert layers == sorted(config["layers"])


# The command line -------------------------------------------------------------------------------------------------

def test_cli_export_matches_the_workflow(exported, tmp_path, capsys):
    workdir, config = exported
    root = run_dir(exported)
    out = tmp_path / "out"
    assert cli.main(["export", str(root), "--format", "delphi", "--format", "neuronpedia", "--format", "duckdb",
                     "--out", str(out), "--delphi-splits", "3"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["format"] for r in reports} == {"delphi", "neuronpedia", "duckdb"}
    for layer in config["layers"]:
        ours, theirs = out / "delphi" / f"layer-{layer}", root / "export" / "delphi" / f"layer-{layer}"
        for path in sorted(theirs.rglob("*.safetensors")):
            a, b = load_file(str(path)), load_file(str(ours / path.relative_to(theirs)))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for path in sorted((root / "export" / "neuronpedia" / f"layer-{layer}").rglob("*.jsonl.gz")):
            twin = out / "neuronpedia" / path.relative_to(root / "export" / "neuronpedia")
            strip = lambda p: [{k: v for k, v in strict_json(l).items() if k != "createdAt"}  # noqa: E731
                               for l in gzip.open(p, "rt", encoding="utf-8")]
            assert strip(path) == strip(twin)
    # the command's views: the rule's, plus the analyses tables the run folder has
    rule_views = (root / "export" / "duckdb" / "views.sql").read_text().splitlines()
    cli_views = (out / "duckdb" / "views.sql").read_text().splitlines()
    assert set(rule_views) <= set(cli_views) and any("VIEW similar" in line for line in cli_views)


def test_cli_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--format", "delphi"]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_a_failed_export_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "layer-0"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["layer-0"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_unknown_export_key_is_refused(reference_run, tmp_path):
    src, config = reference_run
    proc = run_snakemake(tmp_path / "w", {**config, "export": {"parquet": True}}, "-n", check=False)
    assert proc.returncode != 0 and "export: unknown key 'parquet'" in proc.stderr + proc.stdout
