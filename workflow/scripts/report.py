from neuron_embeddings.report import write_report
from neuron_embeddings.runner import run_stage

layers = list(snakemake.params.layers)
run_stage(
    "report",
    lambda: write_report(
        out_path=snakemake.output.page,
        run=snakemake.params.run,
        summary_path=snakemake.input.summary,
        metrics_paths=dict(zip(layers, snakemake.input.metrics)),
        clusters_paths=dict(zip(layers, snakemake.input.clusters)),
        embeddings_paths=dict(zip(layers, snakemake.input.embeddings)),
        documents_path=snakemake.input.documents,
        settings={**snakemake.params.settings, "corpus": snakemake.params.corpus},
        sae_comparisons=list(zip(snakemake.input.sae_comparisons, snakemake.input.sae_figures)),
        corpus_summary_path=snakemake.input.corpus_summary,
        comparison_path=snakemake.input.comparison[0] if snakemake.input.comparison else None,
    ),
    snakemake.log[0],
)
