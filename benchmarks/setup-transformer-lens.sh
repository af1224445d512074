#!/usr/bin/env bash
# The paper's original toolchain, TransformerLens 3.x, in the benchmark's own environment (never a dependency
# of the package): benchmarks/.venv-tl. Used by caching_throughput.py --transformer-lens.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-tl
.venv-tl/bin/pip install --quiet --upgrade pip
.venv-tl/bin/pip install --quiet torch==2.13.0   # the CPU wheel; a range would pull a CUDA build
.venv-tl/bin/pip install --quiet "transformer-lens>=3.9,<4" "torch==2.13.0"
echo "TransformerLens installed in benchmarks/.venv-tl"
