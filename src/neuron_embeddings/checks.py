"""Checks of a configuration that are cheap enough to run before any job starts.

The workflow runs these while parsing the Snakefile (on every cluster job too), so this module and what it
imports never load torch or transformers: a bad config fails in well under a second, with one line naming the
key and the value, and no job (let alone a finished output) is touched.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from pathlib import Path
from typing import Any

from .adapters import UNSUPPORTED
from .errors import PipelineError
from .sources import MANIFEST, ModelSource, check_gguf, resolve


def _key_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def filling_validator(schema: dict[str, Any]) -> Any:
    """A validator that fills in the schema's defaults as it goes, as Snakemake's validate does."""
    import copy

    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if isinstance(prop, dict) and "default" in prop:
                    instance.setdefault(key, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


def fill_defaults(config: dict[str, Any], schema_path: str | os.PathLike) -> dict[str, Any]:
    """A copy of a valid config with the schema's defaults filled in, as Snakemake's validate does in the
    workflow: the schema is the one place a default is written, for the command line and library users too."""
    import copy

    import yaml

    validate_config(config, schema_path)
    filled = copy.deepcopy(config)
    filling_validator(yaml.safe_load(Path(schema_path).read_text())).validate(filled)
    return filled


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike) -> None:
    """The JSON-schema check, as one line naming the key and the value (Snakemake's own validate prints the schema)."""
    import yaml
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = yaml.safe_load(Path(schema_path).read_text())
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is None:
        return
    if error.validator == "oneOf" and not error.absolute_path and isinstance(config, dict):
        # The root's one oneOf: model or models (jsonschema's own message repeats the whole config).
        given = [key for key in ("model", "models") if key in config]
        if len(given) != 1:
            raise PipelineError(
                "config: set either model: {source: ...} (one model) or models: [...] (several), "
                + ("not both" if given else "found neither")
            )
    # Descend into oneOf/anyOf to the alternative whose type fits the value (1.5 is "above the maximum of 1",
    # not "valid under none of the given schemas").
    while error.context:
        fitting = [e for e in error.context if e.validator != "type"]
        error = best_match(fitting or error.context)
    where = _key_path(error.absolute_path) or "config"
    if error.validator == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        extra = sorted(set(error.instance) - set(known)) if isinstance(error.instance, dict) else []
        raise PipelineError(f"{where}: unknown key {', '.join(repr(k) for k in extra)} (known: {', '.join(known)})")
    if error.validator == "required":
        raise PipelineError(f"{where}: {error.message}")
    value = json.dumps(error.instance, default=str)
    if len(value) > 80:
        value = value[:77] + "..."
    raise PipelineError(f"{where}: {value} is not allowed: {error.message}")


def model_entries(config: dict[str, Any], results: str = "results") -> list[dict[str, Any]]:
    """The run's models, the reference first, each with a name and its layers: `models` as given, or the one
    `model` (named after its source). A model without its own `layers` takes the run's; when its depth differs
    from the reference's (both known before any job: a local config.json or a prepared model), the run's layers
    are mapped to the same relative depths."""
    if "models" in config:
        entries = [dict(entry) for entry in config["models"]]
    else:
        source = str(config["model"]["source"]).rstrip("/")
        entries = [{**config["model"], "name": source.split(":")[-1].split("/")[-1] or "model"}]
    names = [entry["name"] for entry in entries]
    for name in names:
        if names.count(name) > 1:
            raise PipelineError(f"models: the name '{name}' is used twice")
    reference = entries[0]
    reference["layers"] = sorted(reference.get("layers") or config["layers"])
    reference_depth = _known_depth(reference, f"{results}/{config['run']}/model")
    for entry in entries[1:]:
        if entry.get("layers"):
            entry["layers"] = sorted(entry["layers"])
            continue
        depth = _known_depth(entry, f"{results}/{config['run']}/models/{entry['name']}/model")
        if reference_depth and depth and depth != reference_depth:
            scale = (depth - 1) / max(reference_depth - 1, 1)
            entry["layers"] = sorted({int(round(layer * scale)) for layer in reference["layers"]})
        else:
            entry["layers"] = list(reference["layers"])
    return entries


def _known_depth(entry: dict[str, Any], prepared_model: str) -> int | None:
    try:
        return model_layer_count(ModelSource.from_config(entry), prepared_model)
    except PipelineError:
        return None  # the source's own check reports it, with its key


def tokenizer_key(entry: dict[str, Any]) -> tuple[str, str | None]:
    """Models with equal keys tokenize alike and share one corpus: the same source (a random-initialised control,
    or another revision of a hub model: checkpoints of one training run keep their tokenizer)."""
    return (str(entry["source"]), entry.get("gguf_file"))


def threshold_for(layer: int, threshold: float | dict[str, Any]) -> float:
    """The clustering threshold of one layer: a number, or {default, per_layer: {"0": 0.5}}."""
    if isinstance(threshold, dict):
        per_layer = {int(k): v for k, v in (threshold.get("per_layer") or {}).items()}
        return float(per_layer.get(layer, threshold["default"]))
    return float(threshold)


def _model_config(spec: ModelSource) -> tuple[dict[str, Any] | None, str | None]:
    """The model's config.json (None when only the hub has it) and its GGUF file, resolved."""
    folder, gguf = resolve(spec)
    if gguf:
        check_gguf(os.path.join(folder, gguf))
        return None, gguf
    config_json = Path(folder) / "config.json"
    if not config_json.is_file():
        if os.path.isdir(folder):
            raise PipelineError(f"model.source: '{spec.source}' is a folder without config.json (not a saved model)")
        return None, None
    try:
        return json.loads(config_json.read_text()), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{config_json}: not valid JSON ({exc})") from None


def model_layer_count(spec: ModelSource, prepared_model: str | os.PathLike | None) -> int | None:
    """The model's number of layers if it can be known without loading weights, else None."""
    if prepared_model and (Path(prepared_model) / MANIFEST).is_file():
        return int(json.loads((Path(prepared_model) / MANIFEST).read_text())["n_layers"])
    cfg, _ = _model_config(spec)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if cfg and key in cfg:
            return int(cfg[key])
    return None


def check_model(config: dict[str, Any], prepared_model: str | os.PathLike | None = None) -> None:
    spec = ModelSource.from_config(config["model"])
    cfg, _ = _model_config(spec)
    if cfg is not None:
        # Any family whose MLP can be found and verified works (prepare_model decides, before the weights are
        # read); only those that cannot work at all are refused here, before any job starts.
        model_type = cfg.get("model_type")
        if model_type in UNSUPPORTED:
            raise PipelineError(f"model.source: model_type '{model_type}' is not supported: {UNSUPPORTED[model_type]}")
        architectures = cfg.get("architectures") or []
        causal = any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures)
        if cfg.get("is_encoder_decoder") or (architectures and not causal and not cfg.get("is_decoder")):
            raise PipelineError(
                f"model.source: {', '.join(architectures) or model_type} (model_type '{model_type}') is not a "
                "decoder-only causal language model, which the method's caching needs (causal attention)"
            )
        positions = next((cfg[k] for k in ("max_position_embeddings", "n_positions") if k in cfg), None)
        window = config["corpus"]["window_tokens"]
        if positions is not None and window > int(positions):
            raise PipelineError(f"corpus.window_tokens: {window} is longer than the model's {positions} positions")
    n_layers = model_layer_count(spec, prepared_model)
    if n_layers is not None:
        bad = [layer for layer in config["layers"] if layer >= n_layers]
        if bad:
            raise PipelineError(f"layers: {bad} out of range; the model has layers 0..{n_layers - 1}")


def check_corpus(config: dict[str, Any]) -> None:
    corpus = config["corpus"]
    for index, source in enumerate(corpus["sources"]):
        if "encoding" in source:
            try:
                codecs.lookup(source["encoding"])
            except LookupError:
                raise PipelineError(
                    f"corpus.sources[{index}].encoding: '{source['encoding']}' is not a text encoding Python knows"
                ) from None
        if "path" in source:
            pattern = os.path.expanduser(source["path"])
            matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                raise PipelineError(f"corpus.sources[{index}].path: '{source['path']}' matches no file")
            if all(os.path.getsize(f) == 0 for f in files):
                raise PipelineError(f"corpus.sources[{index}].path: '{source['path']}' matches only empty files")
    if corpus["min_window_tokens"] > corpus["window_tokens"]:
        raise PipelineError(
            f"corpus.min_window_tokens: {corpus['min_window_tokens']} is larger than "
            f"corpus.window_tokens ({corpus['window_tokens']})"
        )


def check_config(config: dict[str, Any], prepared_model: str | os.PathLike | None = None,
                 prepared_models: dict[str, str] | None = None) -> None:
    """Everything that can be known wrong before a job runs; raises PipelineError (one line, naming the key)."""
    entries = model_entries(config)
    for index, entry in enumerate(entries):
        where = (prepared_models or {}).get(entry["name"], prepared_model if index == 0 else None)
        try:
            check_model({**config, "model": entry, "layers": entry["layers"]}, where)
        except PipelineError as exc:
            if "models" not in config:
                raise
            raise PipelineError(f"models[{index}] ({entry['name']}): {exc}") from None
    check_corpus(config)
    sel = config["selection"]
    selection_passes(sel)
    needed = sel["context_before"] + sel["context_after"] + 1
    if needed > 4 * config["corpus"]["window_tokens"] + 1:
        raise PipelineError("selection.context_before/after: the context is far wider than corpus.window_tokens")


def config_warnings(config: dict[str, Any]) -> list[str]:
    """What looks like a slip but may be meant: printed at start-up, never stopping the run. A per-layer threshold
    for a layer not run is normal for a map kept for a whole model and run on a subset, and a typo otherwise."""
    threshold = (config.get("clustering") or {}).get("threshold")
    if not isinstance(threshold, dict):
        return []
    unused = sorted({int(key) for key in threshold.get("per_layer") or {}} - set(config["layers"]))
    if not unused:
        return []
    return [f"warning: clustering.threshold.per_layer: layers {unused} are not in layers {sorted(config['layers'])}, "
            f"so their thresholds are not used"]


def selection_passes(selection: dict[str, Any]) -> int:
    """How many passes over the corpus the threshold selection takes: auto is one, unless quantile bins are asked
    for, which are fractions of the final max and so need it before the pass that samples them."""
    quantiles = selection["quantiles"]
    bins = bool(quantiles["bins"] and quantiles["per_bin"])
    passes = selection["passes"]
    if passes == "auto":
        return 2 if bins else 1
    if passes == 1 and bins and selection["mode"] == "threshold":
        raise PipelineError("selection.passes: 1 cannot sample selection.quantiles (their bins are fractions of the "
                            "final max); use passes: auto or 2")
    return int(passes)


# Snakemake releases whose scheduler may start jobs whose threads add up to more than --cores (upstream issue
# 3913): on this project's 2-core machine the demo's four 2-thread caching jobs then ran at once, 15x slower.
OVERSUBSCRIBING_SNAKEMAKE = ((9, 10), (9, 17))


def scheduler_warning(snakemake_version: str) -> str | None:
    """A one-line warning for a Snakemake release that oversubscribes the cores, or None."""
    try:
        major_minor = tuple(int(part) for part in snakemake_version.split(".")[:2])
    except ValueError:
        return None
    first, fixed = OVERSUBSCRIBING_SNAKEMAKE
    if first <= major_minor < fixed:
        return (
            f"warning: Snakemake {snakemake_version} may run more threads at once than --cores allows "
            f"(its scheduler, releases {first[0]}.{first[1]} to {fixed[0]}.{fixed[1] - 1}); "
            f"install snakemake>={fixed[0]}.{fixed[1]}"
        )
    return None
