#!/usr/bin/env bash
# Build the SGLang CPU server's own virtualenv (never the trainer's: sglang pins other
# transformers / tokenizers versions). Usage: tools/sglang_cpu/setup.sh [VENV_DIR]  (default .venv-sglang)
#
# sglang 0.5.21 is the last release whose wheel pins torch==2.13.0 (the CPU build pip takes here).
# It is installed without its dependencies, then requirements.txt (its Requires-Dist minus the
# CUDA-only and unneeded packages), then our CPU stand-in for sgl_kernel and the source fixes in
# compat.py. Every piece is documented in patches/README.md. Idempotent: re-running repairs.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-.venv-sglang}"
SGLANG_VERSION=0.5.21

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -c "$HERE/constraints.txt" -r "$HERE/requirements.txt"
"$PY" -m pip install -q --no-deps "sglang==$SGLANG_VERSION"
"$PY" -m pip install -q --no-deps --force-reinstall "$HERE/sgl_kernel_standin"
"$PY" "$HERE/compat.py" --apply
# The server's imports that the fixes are about, without starting anything:
"$PY" -c "import torch, torchvision, sgl_kernel, sglang; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('sglang', sglang.__version__, 'ready in', '$VENV')"
