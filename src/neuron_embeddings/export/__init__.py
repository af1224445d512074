"""Handing a finished run to the tools researchers use next (docs/exports.md).

- `delphi`: EleutherAI's delphi latent cache (per hookpoint a folder of `{start}_{end}.safetensors` shards and a
  config.json), the layer's neurons as latents and, as a second hookpoint, its feature clusters as latents, so
  delphi's explainer and scorers run on them unchanged.
- `neuronpedia`: Neuronpedia's bulk-import layout (release, model, source set, source, features and activations
  as JSON lines, the last two gzipped), one feature per neuron with its clusters in the feature's data.
- `sql`: the DuckDB views over a run's Parquet files (embeddings, clusters, metrics across layers).

Each writer reads the pipeline's own files only (schemas.py); nothing here runs the model.
"""

FORMATS = ("delphi", "neuronpedia", "duckdb")


def export_targets(run_dir: str, layers: list[int], settings: dict) -> list[str]:
    """The outputs of the switched-on formats (config key export) for a run folder's layers (workflow: all)."""
    targets = []
    for fmt in ("delphi", "neuronpedia"):
        if settings[fmt]:
            targets += [f"{run_dir}/export/{fmt}/layer-{layer}" for layer in layers]
    if settings["duckdb"]:
        targets.append(f"{run_dir}/export/duckdb/views.sql")
    return targets
