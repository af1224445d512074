"""One layer in Neuronpedia's bulk-import layout, one feature per neuron with its clusters in the feature's data.

The layout and the fields are those of SAEDashboard's Neuronpedia export (jbloomAus/SAEDashboard,
sae_dashboard/neuronpedia/neuronpedia_export.py, whose dataclasses mirror neuronpedia-utils' db_models), which
Neuronpedia's importer reads (`{model}/{source}/` with release, model, sourceset and source as plain JSON lines,
features/*.jsonl.gz into its Neuron table and activations/*.jsonl.gz into its Activation table):

    <out>/<model_id>/<layer>-<source_set>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl
        features/batch-<i>.jsonl.gz      one record per neuron (FIELDS["feature"] + "clusters", "polysemanticity")
        activations/batch-<i>.jsonl.gz   one record per example (FIELDS["activation"])

An activation record is an example's context window: `tokens` (decoded text), `values` (the neuron's activation
per token, in the direction the example was selected on), `maxValue`/`maxValueTokenIndex` (as SAEDashboard
computes them: the largest value and its first index) and `qualifyingTokenIndex` (the example's max token, the one
it was selected at). Neuronpedia's importer keeps only the keys that are columns of its tables, so the feature
keys `clusters` and `polysemanticity` travel in the files for other readers and are not shown on Neuronpedia.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import PipelineError
from .common import atomic_dir, finite_or_none, folder_size, json_line, read_layer, read_metrics

# SAEDashboard's fallback creator id (neuronpedia_export.py, FALLBACK_CREATOR_ID), used when none is configured.
FALLBACK_CREATOR_ID = "clkht01d40000jv08hvalcvly"
FEATURES_PER_FILE = 256
DIGITS = 4  # values are rounded (SAEDashboard rounds to 3 decimals; a tiny model's activations are small)

# The fields of each record, from SAEDashboard's dataclasses (neuronpedia_export.py): name -> JSON types.
_STR, _INT, _NUM, _BOOL, _NULL = "string", "integer", "number", "boolean", "null"
_STRS = {"type": "array", "items": {"type": _STR}}
_NUMS = {"type": "array", "items": {"type": _NUM}}
_INTS = {"type": "array", "items": {"type": _INT}}
_TIME = {"type": _STR, "format": "date-time"}


def _t(*types: str) -> dict[str, Any]:
    return {"type": list(types) if len(types) > 1 else types[0]}


FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "release": {
        "name": _t(_STR), "description": _t(_STR), "creatorName": _t(_STR), "creatorId": _t(_STR),
        "visibility": _t(_STR), "isNewUi": _t(_BOOL), "featured": _t(_BOOL), "descriptionShort": _t(_STR, _NULL),
        "urls": _STRS, "creatorEmail": _t(_STR, _NULL), "creatorNameShort": _t(_STR, _NULL),
        "defaultSourceSetName": _t(_STR, _NULL), "defaultSourceId": _t(_STR, _NULL), "defaultUmapSourceIds": _STRS,
        "createdAt": _TIME,
    },
    "model": {
        "id": _t(_STR), "instruct": _t(_BOOL), "creatorId": _t(_STR), "displayNameShort": _t(_STR),
        "displayName": _t(_STR), "tlensId": _t(_STR, _NULL), "dimension": _t(_INT, _NULL), "visibility": _t(_STR),
        "defaultSourceSetName": _t(_STR, _NULL), "defaultSourceId": _t(_STR, _NULL), "inferenceEnabled": _t(_BOOL),
        "layers": _t(_INT), "neuronsPerLayer": _t(_INT), "createdAt": _TIME, "owner": _t(_STR), "updatedAt": _TIME,
        "website": _t(_STR, _NULL),
    },
    "sourceset": {
        "modelId": _t(_STR), "name": _t(_STR), "creatorId": _t(_STR), "hasDashboards": _t(_BOOL),
        "visibility": _t(_STR), "description": _t(_STR), "type": _t(_STR), "creatorName": _t(_STR), "urls": _STRS,
        "creatorEmail": _t(_STR, _NULL), "releaseName": _t(_STR, _NULL), "defaultOfModelId": _t(_STR, _NULL),
        "defaultRange": _t(_INT), "defaultShowBreaks": _t(_BOOL), "showDfa": _t(_BOOL), "showCorrelated": _t(_BOOL),
        "showHeadAttribution": _t(_BOOL), "showUmap": _t(_BOOL), "createdAt": _TIME,
    },
    "source": {
        "id": _t(_STR), "modelId": _t(_STR), "setName": _t(_STR), "creatorId": _t(_STR), "hasDashboards": _t(_BOOL),
        "inferenceEnabled": _t(_BOOL), "inferenceHosts": _STRS, "saelensConfig": _t(_STR, _NULL),
        "saelensRelease": _t(_STR, _NULL), "saelensSaeId": _t(_STR, _NULL), "hfRepoId": _t(_STR, _NULL),
        "hfFolderId": _t(_STR, _NULL), "visibility": _t(_STR), "defaultOfModelId": _t(_STR, _NULL),
        "hasUmap": _t(_BOOL), "hasUmapLogSparsity": _t(_BOOL), "hasUmapClusters": _t(_BOOL),
        "num_prompts": _t(_INT, _NULL), "num_tokens_in_prompt": _t(_INT, _NULL), "dataset": _t(_STR, _NULL),
        "notes": _t(_STR, _NULL), "createdAt": _TIME,
    },
    "feature": {
        "modelId": _t(_STR), "layer": _t(_STR), "index": _t(_STR), "creatorId": _t(_STR, _NULL), "createdAt": _TIME,
        "maxActApprox": _t(_NUM, _NULL), "hasVector": _t(_BOOL), "vector": _NUMS, "vectorLabel": _t(_STR, _NULL),
        "vectorDefaultSteerStrength": _t(_NUM, _NULL), "hookName": _t(_STR, _NULL), "topkCosSimIndices": _INTS,
        "topkCosSimValues": _NUMS, "neuron_alignment_indices": _INTS, "neuron_alignment_values": _NUMS,
        "neuron_alignment_l1": _NUMS, "correlated_neurons_indices": _INTS, "correlated_neurons_pearson": _NUMS,
        "correlated_neurons_l1": _NUMS, "correlated_features_indices": _INTS, "correlated_features_pearson": _NUMS,
        "correlated_features_l1": _NUMS, "neg_str": _STRS, "neg_values": _NUMS, "pos_str": _STRS, "pos_values": _NUMS,
        "frac_nonzero": _t(_NUM), "freq_hist_data_bar_heights": _NUMS, "freq_hist_data_bar_values": _NUMS,
        "logits_hist_data_bar_heights": _NUMS, "logits_hist_data_bar_values": _NUMS, "decoder_weights_dist": _NUMS,
        "sourceSetName": _t(_STR, _NULL),
    },
    "activation": {
        "id": _t(_STR), "tokens": _STRS, "index": _t(_STR), "layer": _t(_STR), "modelId": _t(_STR),
        "maxValue": _t(_NUM), "maxValueTokenIndex": _t(_INT), "minValue": _t(_NUM), "values": _NUMS,
        "creatorId": _t(_STR), "dataSource": _t(_STR, _NULL), "dataIndex": _t(_STR, _NULL), "dfaValues": _NUMS,
        "dfaTargetIndex": _t(_INT, _NULL), "dfaMaxValue": _t(_NUM, _NULL), "createdAt": _TIME, "lossValues": _NUMS,
        "logitContributions": _t(_STR, _NULL), "binMin": _t(_NUM, _NULL), "binMax": _t(_NUM, _NULL),
        "binContains": _t(_NUM, _NULL), "qualifyingTokenIndex": _t(_INT, _NULL),
        "zIndices": {"type": ["array", "null"], "items": _INTS}, "zValues": {"type": ["array", "null"], "items": {"type": _NUM}},
    },
}

# What this export adds to a feature record (Neuronpedia's importer drops keys that are not columns).
CLUSTER_ITEM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["cluster", "size", "central_example_rank", "central_token", "mean_similarity", "example_ranks",
                 "activation_ids"],
    "properties": {
        "cluster": {"type": "integer", "minimum": 0},
        "size": {"type": "integer", "minimum": 1},
        "central_example_rank": {"type": "integer", "minimum": 0},
        "central_token": {"type": "string"},
        "mean_similarity": {"type": ["number", "null"]},
        "example_ranks": _INTS,
        "activation_ids": _STRS,
    },
}
EXTRAS: dict[str, dict[str, dict[str, Any]]] = {
    "feature": {"clusters": {"type": "array", "items": CLUSTER_ITEM},
                "polysemanticity": {"type": "object", "required": ["status", "size", "n_clusters"]}},
}


def record_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) a record of one kind validates against: every SAEDashboard field, of its type,
    present, and nothing else but this export's documented extras."""
    properties = {**FIELDS[kind], **EXTRAS.get(kind, {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": sorted(properties),
        "properties": properties,
    }


def model_id_of(source: str) -> str:
    """A Neuronpedia-style model id from a model source: its last path part, lowercased, [a-z0-9.-] only."""
    name = re.split(r"[/:\\]", source.rstrip("/\\"))[-1].lower()
    name = re.sub(r"[^a-z0-9.-]+", "-", name).strip("-.")
    return name or "model"


def activation_id(model_id: str, source_id: str, neuron: int, rank: int) -> str:
    """A stable 25-character id in the cuid shape Neuronpedia uses (same example, same id, every export)."""
    return "c" + hashlib.sha256(f"{model_id}/{source_id}/{neuron}/{rank}".encode()).hexdigest()[:24]


def _write_jsonl(path: Path, records: list[dict[str, Any]], gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json_line(r) for r in records).encode("utf-8")
    if gz:
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=5, mtime=0) as handle:
            handle.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)


def _round_list(values: np.ndarray) -> list[float]:
    return [round(float(v), DIGITS) if np.isfinite(v) else 0.0 for v in values]


def export_neuronpedia_layer(
    embeddings: str | os.PathLike,
    clusters: str | os.PathLike,
    metrics: str | os.PathLike,
    corpus_shards: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    layer: int,
    run: str,
    settings: dict[str, Any],
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """Write `out_dir` (replaced whole) for one layer. settings: the config's export keys neuronpedia_model,
    neuronpedia_source_set, neuronpedia_release, neuronpedia_creator, neuronpedia_creator_id (None: defaults
    derived from the model and the run)."""
    data = read_layer(embeddings, clusters, layer)
    metrics_table = read_metrics(metrics)
    model = data.model
    model_id = settings["neuronpedia_model"] or model_id_of(str(model.get("source", "model")))
    source_set = settings["neuronpedia_source_set"]
    release = settings["neuronpedia_release"] or f"neuron-embeddings-{run}"
    creator = settings["neuronpedia_creator"]
    creator_id = settings["neuronpedia_creator_id"] or FALLBACK_CREATOR_ID
    source_id = f"{layer}-{source_set}"
    when = (created_at or datetime.now(timezone.utc)).isoformat()
    windows = sum(pq.ParquetFile(path).metadata.num_rows for path in corpus_shards)
    description = (f"MLP neurons of {model.get('source', model_id)}, each with its feature clusters from neuron "
                   f"embeddings (run {run})")

    release_rec = {
        "name": release, "description": description, "creatorName": creator, "creatorId": creator_id,
        "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": f"Neuron embeddings: {run}",
        "urls": [], "creatorEmail": None, "creatorNameShort": creator, "defaultSourceSetName": source_set,
        "defaultSourceId": source_id, "defaultUmapSourceIds": [], "createdAt": when,
    }
    model_rec = {
        "id": model_id, "instruct": model_id.endswith("-it") or "instruct" in model_id, "creatorId": creator_id,
        "displayNameShort": model_id, "displayName": model_id, "tlensId": None,
        "dimension": int(model["d_model"]) if model.get("d_model") is not None else None, "visibility": "PUBLIC",
        "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
        "layers": int(model.get("n_layers") or 0), "neuronsPerLayer": data.n_units, "createdAt": when, "owner": "",
        "updatedAt": when, "website": None,
    }
    sourceset_rec = {
        "modelId": model_id, "name": source_set, "creatorId": creator_id, "hasDashboards": True,
        "visibility": "PUBLIC", "description": "MLP neurons (feature clusters in each feature's data)", "type": "",
        "creatorName": creator, "urls": [], "creatorEmail": None, "releaseName": release, "defaultOfModelId": None,
        "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
        "showHeadAttribution": False, "showUmap": False, "createdAt": when,
    }
    source_rec = {
        "id": source_id, "modelId": model_id, "setName": source_set, "creatorId": creator_id, "hasDashboards": True,
        "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
        "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": None,
        "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": int(windows),
        "num_tokens_in_prompt": data.window_tokens, "dataset": f"results/{run}/corpus",
        "notes": f"neuron-embeddings export of run {run}, layer {layer}", "createdAt": when,
    }

    # Per-example columns, in neuron then example_rank order.
    neuron = data.column("neuron").astype(np.int64)
    rank = data.column("example_rank").astype(np.int64)
    cluster = data.column("cluster").astype(np.int64)
    central = data.column("is_central")
    similarity = data.column("mean_similarity")
    center = data.column("context_center").astype(np.int64)
    sample = data.table.column("sample").to_pylist()
    token = data.table.column("token").to_pylist()
    contexts = data.table.column("context_tokens").to_pylist()
    acts = data.table.column("context_activations").to_pylist()
    orient = data.orientation()

    metric_rows = {int(r["neuron"]): r for r in metrics_table.to_pylist()}
    if sorted(metric_rows) != list(range(data.n_units)):
        raise PipelineError(f"{metrics}: expected one row per neuron 0..{data.n_units - 1}")
    starts = np.searchsorted(neuron, np.arange(data.n_units + 1))

    features, activations, batches = [], [], []
    counts = {"features": 0, "activations": 0}

    def flush(batch: int) -> None:
        batches.append((batch, list(features), list(activations)))
        counts["features"] += len(features)
        counts["activations"] += len(activations)
        features.clear()
        activations.clear()

    for n in range(data.n_units):
        examples = range(starts[n], starts[n + 1])
        max_act = 0.0
        ids = {}
        for i in examples:
            values = np.asarray(acts[i], dtype=np.float32) * orient[i]
            rounded = _round_list(values)
            top = max(rounded)
            max_act = max(max_act, top)
            ids[i] = activation_id(model_id, source_id, n, int(rank[i]))
            top_sample = not sample[i].startswith("quantile")
            activations.append({
                "id": ids[i], "tokens": contexts[i], "index": str(n), "layer": source_id, "modelId": model_id,
                "maxValue": top, "maxValueTokenIndex": rounded.index(top), "minValue": min(rounded),
                "values": rounded, "creatorId": creator_id, "dataSource": None, "dataIndex": None, "dfaValues": [],
                "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": when, "lossValues": [],
                "logitContributions": None,
                # SAEDashboard's "top activations" group (bin_min -1, bin_contains -1); quantile samples: no bin
                "binMin": -1.0 if top_sample else None, "binMax": None, "binContains": -1.0 if top_sample else None,
                "qualifyingTokenIndex": int(center[i]), "zIndices": None, "zValues": None,
            })
        for record in activations[len(activations) - len(examples):]:
            if record["binMin"] is not None:
                record["binMax"] = max_act
        groups = {}
        for i in examples:
            if cluster[i] >= 0:
                groups.setdefault(int(cluster[i]), []).append(i)
        cluster_items = []
        for c in sorted(groups):
            members = groups[c]
            mid = next((i for i in members if central[i]), members[0])
            cluster_items.append({
                "cluster": c, "size": len(members), "central_example_rank": int(rank[mid]),
                "central_token": token[mid], "mean_similarity": finite_or_none(similarity[mid], DIGITS),
                "example_ranks": [int(rank[i]) for i in members], "activation_ids": [ids[i] for i in members],
            })
        metric = metric_rows[n]
        poly = {k: (finite_or_none(v, 6) if isinstance(v, float) else v) for k, v in metric.items()
                if k not in ("layer", "neuron")}
        features.append({
            "modelId": model_id, "layer": source_id, "index": str(n), "creatorId": creator_id, "createdAt": when,
            "maxActApprox": max_act, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
            "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
            "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
            "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
            "frac_nonzero": finite_or_none(metric["frac_positive"], 6) or 0.0,
            "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [], "decoder_weights_dist": [], "sourceSetName": source_set,
            "clusters": cluster_items, "polysemanticity": poly,
        })
        if len(features) == FEATURES_PER_FILE:
            flush(len(batches))
    if features:
        flush(len(batches))

    with atomic_dir(out_dir) as tmp:
        folder = tmp / model_id / source_id
        _write_jsonl(folder / "release.jsonl", [release_rec], gz=False)
        _write_jsonl(folder / "model.jsonl", [model_rec], gz=False)
        _write_jsonl(folder / "sourceset.jsonl", [sourceset_rec], gz=False)
        _write_jsonl(folder / "source.jsonl", [source_rec], gz=False)
        for batch, feats, acts_batch in batches:
            _write_jsonl(folder / "features" / f"batch-{batch}.jsonl.gz", feats, gz=True)
            if acts_batch:
                _write_jsonl(folder / "activations" / f"batch-{batch}.jsonl.gz", acts_batch, gz=True)
        size = folder_size(tmp)
    return {"layer": layer, "model_id": model_id, "source_id": source_id, "features": counts["features"],
            "activations": counts["activations"], "files": len(batches), "bytes": size}
