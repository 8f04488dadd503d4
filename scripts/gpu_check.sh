#!/usr/bin/env bash
# The GPU checks of issue 18, on a machine with CUDA and the environment of scripts/setup.sh (with a
# CUDA build of torch): the cuda tests (workers on cuda, bf16 autocast on cuda, torchrun over every GPU
# with NCCL), then the inner loop's throughput in fp32 and bf16, on one GPU and over all of them.
# The tables it prints go into docs/benchmarks.md ("GPU: precision and torchrun").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
"$PY" bench/precision.py --device cuda
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" bench/precision.py --device cuda \
    --batch $((32 * GPUS))
