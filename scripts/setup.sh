#!/usr/bin/env bash
# Set up a fresh machine: redis-server (apt), a virtual environment in .venv with the CPU build
# of PyTorch, and this package with its test extras. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    echo "setup: installing redis-server with apt-get" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls GBs of CUDA.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, redis, boto3, safetensors, msgpack, rich, moto, pytest, hypothesis, yaml, transformers, datasets, tokenizers, tensorboard" \
    || { echo "setup: the Python environment in .venv is incomplete" >&2; exit 1; }
