from neuron_embeddings.runner import run_stage
from neuron_embeddings.toy import ProbeSettings, ToySettings, run_toy

sparsity, seed = float(snakemake.wildcards.sparsity), int(snakemake.wildcards.seed)
input_dim = int(snakemake.wildcards.input) or None
clustering = snakemake.params.clustering
run_stage(
    f"train_toy input {input_dim or 0} sparsity {sparsity} seed {seed}",
    lambda: run_toy(
        ToySettings(**snakemake.params.model, sparsity=sparsity, seed=seed, input_dim=input_dim),
        ProbeSettings(**snakemake.params.probe),
        thresholds=list(clustering["thresholds"]),
        methods=list(clustering["methods"]),
        model_path=snakemake.output.model,
        scores_path=snakemake.output.scores,
    ),
    snakemake.log[0],
    threads=snakemake.threads,
)
