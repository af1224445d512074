from neuron_embeddings.compare import compare_models, describe_model
from neuron_embeddings.runner import run_stage


def main():
    models = {}
    for name, spec in snakemake.params.models.items():
        folder = f"results/{spec['run']}"
        n_layers, description = describe_model(f"{folder}/model/neuron_embeddings.json")
        models[name] = {
            "n_layers": n_layers,
            "layers": spec["layers"],
            "metrics": {layer: f"{folder}/metrics/layer-{layer}.parquet" for layer in spec["layers"]},
            "description": description,
        }
    return compare_models(models, snakemake.output.json, snakemake.output.html, snakemake.params.resamples,
                          snakemake.params.seed)


run_stage("compare_models", main, snakemake.log[0])
