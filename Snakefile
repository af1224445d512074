# The neuron-embedding pipeline. Stages, one rule file each, data flowing one way:
# model -> corpus -> activations (GPU) -> selection -> embeddings -> clustering -> metrics -> report
# and, from there, the analyses (token importance: GPU) -> per-layer plots, run table, and the static explorer;
# with several models (config key models), each goes through model -> metrics and the comparison puts them side by side
from snakemake.utils import min_version

min_version("8.20")


# A run is one YAML file: config.yaml (the demo) unless --configfile names another. Snakemake would merge the two
# key by key, so a user's config would inherit the demo's models, SAE and settings it leaves out.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


wildcard_constraints:
    layer=r"\d+",
    shard=r"\d+",
    group=r"layers(-\d+)+",  # a cache group: the layers one forward pass per shard serves (common.smk)


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/embeddings.smk"
include: "workflow/rules/clustering.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/explorer.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/comparison.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        all_targets(),
