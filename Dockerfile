# syntax=docker/dockerfile:1.7
# resnet-serve container images (deploy/README.md, "Container images"). Targets:
#   cpu     the server on a slim Python base with onnxruntime      --target cpu    -> <version>-cpu
#   gpu     the server on CUDA 13 + cuDNN 9 with onnxruntime-gpu   --target gpu    -> <version>-gpu
#   export  resnet-export with CPU PyTorch: the chart's init container --target export -> <version>-export
# The model package: MODEL_SOURCE=export (default) bakes /models/$MODEL_NAME in at build time
# with resnet-export (build args ARCH, WEIGHTS, PRECISION); MODEL_SOURCE=none leaves /models
# empty for a volume, a PVC or an init container. Every Python dependency comes from
# constraints.txt; the final stages hold no compiler, no pip cache and no torch. The servers
# install the `grpc` extra (the chart serves gRPC by default) and `tracing` (OpenTelemetry,
# imported only when OTEL_* variables switch traces on; deploy/README.md, "Turn tracing on").

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG MODEL_SOURCE=export

# ---------------------------------------------------------------- Python (CPU) base
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# tini as PID 1: forwards SIGTERM to the server (which drains) and reaps zombies; it also
# ends the process on SIGTERM before the server has installed its own handlers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- CPU server, built
FROM python-base AS build-cpu
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY model_export/ model_export/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt ".[cpu,grpc,tracing]"

# ---------------------------------------------------------------- export (resnet-export, CPU torch)
FROM python-base AS export
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY model_export/ model_export/
# The CPU build of the pinned torch (2.14.1+cpu satisfies torch==2.14.1): no CUDA libraries.
# `export` brings no ONNX Runtime of its own: `cpu` gives it the CPU build.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt ".[cpu,export]" \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /tmp app \
    && mkdir -p /models && chown app:app /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TORCH_HOME=/tmp/torch
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "resnet-export"]
CMD ["--help"]

# ---------------------------------------------------------------- the model package
FROM export AS model-export
ARG ARCH=resnet50
ARG MODEL_NAME=resnet50
# DEFAULT, IMAGENET1K_V1 or IMAGENET1K_V2 (torchvision, downloaded now, at build time), or
# "random" for seeded random weights (an untrained model, for smoke tests).
ARG WEIGHTS=DEFAULT
# The variant beside fp32: int8 for CPU images, fp16 for GPU images.
ARG PRECISION=int8
RUN if [ "${WEIGHTS}" = "random" ]; then weights_arg="--random-init"; else weights_arg="--weights=${WEIGHTS}"; fi \
    && resnet-export --arch "${ARCH}" "${weights_arg}" --precision "${PRECISION}" \
        --name "${MODEL_NAME}" --out "/models/${MODEL_NAME}" --quiet

FROM python-base AS model-none
RUN mkdir -p /models

# A stage chosen by build arg, not an image from a registry: nothing to tag.
# hadolint ignore=DL3006
FROM model-${MODEL_SOURCE} AS model

# ---------------------------------------------------------------- cpu: the CPU server image
FROM python-base AS cpu
ARG MODEL_NAME=resnet50
LABEL org.opencontainers.image.title="resnet-serve (CPU)" \
      org.opencontainers.image.description="ResNet image classification and embeddings on ONNX Runtime, CPU" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /tmp app
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=model --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_DIR=/models/${MODEL_NAME} \
    RESNET_SERVE_PRECISION=int8
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "resnet-serve"]

# ---------------------------------------------------------------- CUDA base
FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's Python 3.12: the interpreter and venv only, no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS build-gpu
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY model_export/ model_export/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt ".[gpu,grpc,tracing]"

# ---------------------------------------------------------------- gpu: the GPU server image
FROM cuda-base AS gpu
ARG MODEL_NAME=resnet50
LABEL org.opencontainers.image.title="resnet-serve (GPU)" \
      org.opencontainers.image.description="ResNet image classification and embeddings on ONNX Runtime, CUDA" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /tmp app
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=model --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_DIR=/models/${MODEL_NAME} \
    RESNET_SERVE_PRECISION=fp16
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "resnet-serve"]
