from dataclasses import asdict

from neuron_embeddings.models import ModelSource, prepare_model
from neuron_embeddings.runner import run_stage

spec = ModelSource.from_config(snakemake.params.model)
run_stage("prepare_model", lambda: asdict(prepare_model(spec, snakemake.output.model)), snakemake.log[0])
