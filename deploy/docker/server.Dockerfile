# syntax=docker/dockerfile:1.7
# Server image: `userembed serve` (gRPC embedding service), `refresh`, `rollback`, `embed`,
# `health`. NO torch: the serve + refresh extras with onnxruntime-gpu in place of onnxruntime
# (the same `onnxruntime` module: never both). Without a visible GPU onnxruntime-gpu runs on
# its CPUExecutionProvider, so one image serves both.
# Build from the repository root:  docker build -f deploy/docker/server.Dockerfile -t userembed-server .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# Python 3.11 from deadsnakes: Ubuntu 22.04 ships 3.10.
FROM ${CUDA_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common gpg-agent \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && pip install --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python deploy/docker/requirements.py serve refresh --swap onnxruntime=onnxruntime-gpu \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY protos protos
COPY userembed userembed
COPY trainer trainer
COPY embed_server embed_server
COPY refresh refresh
# The contract of this image, checked at build time: no torch, and the onnxruntime module only
# from onnxruntime-gpu.
RUN pip install "$(python deploy/docker/requirements.py dev | grep '^grpcio-tools')" \
 && VENV=/opt/venv protos/generate.sh \
 && pip uninstall -y grpcio-tools \
 && pip install --no-deps . \
 && python -c "import embed_server.server, refresh.job, onnxruntime, ray" \
 && ! pip show torch >/dev/null 2>&1 \
 && ! pip show onnxruntime >/dev/null 2>&1 \
 && pip show onnxruntime-gpu >/dev/null

FROM python AS runtime
# /similar owned by app: an empty compose volume mounted there takes that owner, so the refresh
# (the similar-users indexes' one writer) can write it.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /workspace /similar && chown app:app /workspace /similar
COPY --from=build /opt/venv /opt/venv
COPY --chown=app:app feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    USEREMBED_HOME=/workspace \
    USEREMBED_FEATURE_REPO=/app/feature_repo \
    USEREMBED_HOST=0.0.0.0 \
    USEREMBED_GRPC_PORT=50051 \
    USEREMBED_METRICS_PORT=9464
WORKDIR /workspace
USER app
EXPOSE 50051 9464
# The standard gRPC health service on the serving port (SERVING once a model is loaded).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD userembed health --target 127.0.0.1:${USEREMBED_GRPC_PORT}
CMD ["userembed", "serve"]
