# The diloco image: one image for every diloco service of compose.yaml (acl, init, aggregator,
# worker, eval, status/monitor) and the operator commands (ENTRYPOINT is `diloco`).
#
#   docker build -t diloco:latest .                     # CPU torch (the default)
#   docker build -t diloco:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# GPU: TORCH_INDEX must name a CUDA wheel index that publishes torch==${TORCH_VERSION} for
# Python 3.11 (https://pytorch.org/get-started/locally/ lists them). Old indexes such as cu121
# stop at old torch releases, so pip fails there with "No matching distribution". Run GPU workers
# with WORKER_DEVICE=cuda (DILOCO_DEVICE=cuda) and a GPU reserved for the container.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer, from the chosen index: a plain `pip install .` would pull the
# multi-GB CUDA build from PyPI. The package's `torch>=2.4` is then already satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY . /src
RUN pip install /src && rm -rf /src \
    && python -c "import torch, diloco.cli, workers.worker, aggregator.aggregator"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin diloco
USER diloco
WORKDIR /home/diloco

ENTRYPOINT ["diloco"]
CMD ["--help"]
