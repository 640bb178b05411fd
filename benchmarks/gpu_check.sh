#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) from the repository root, offline, under a 10-minute limit.
#   bash benchmarks/gpu_check.sh                       # torch + megatron-core etc. installed
#   bash benchmarks/gpu_check.sh --wheels wheels       # install the rest from ./wheels first (no network)
# Results are appended to docs/gpu-results.md. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 600 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
