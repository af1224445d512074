# The toy-model validation workflow, separate from the pipeline (README: Toy models with known features):
#   snakemake -s workflow/toy.smk --cores 2
# toy models over a sparsity grid (CPU, seconds each) -> probe, embed, cluster, score against the known features
# -> recovery table, plots, the chosen clustering default, and an HTML report in results/<run>/ (run: toy).
from snakemake.utils import min_version

min_version("8.20")


configfile: "configs/toy.yaml"


include: "rules/toy_common.smk"
include: "rules/toy.smk"


rule all:
    input:
        toy_targets(),
    default_target: True
