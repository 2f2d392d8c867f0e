#!/usr/bin/env bash
# The speed issue's GPU checks in one go (see benchmarks/gpu_check.py); on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# installs the project into .venv if needed (MLCALC_TORCH selects the CUDA torch wheel), then writes OUT_DIR/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
export MLCALC_TORCH=${MLCALC_TORCH:-torch}
./run python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
./run python benchmarks/gpu_check.py --device cuda --out "$out/gpu_check.md"
