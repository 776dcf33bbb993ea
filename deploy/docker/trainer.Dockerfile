# syntax=docker/dockerfile:1.7
# Trainer image: data build, Feast apply / materialize, TorchRec training under torchrun, ONNX
# export. torch 2.13.0 CPU + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0 (--no-deps: its metadata asks
# for the CUDA fbgemm-gpu wheel, which does not load beside the CPU torch; shared/STACK.md).
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t userembed-trainer .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
# torch first, exactly pinned, from the CPU wheel index: nothing may pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
# Pins come from pyproject.toml (one place). `serve` adds onnxruntime (CPU): the export checks
# the ONNX model against PyTorch with it. `refresh` adds Ray: the multi-node Job's Ray offline
# store (docs/data.md, "Offline stores").
RUN python deploy/docker/requirements.py train serve refresh > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps torchrec==1.8.0 recbole==1.2.1
# recbole is installed only for the MovieLens-100K files it ships (never imported).
COPY protos protos
COPY userembed userembed
COPY trainer trainer
COPY embed_server embed_server
COPY refresh refresh
# Generated gRPC code (gitignored) is produced here by the project's one script; grpcio-tools is
# a build-time tool only.
RUN pip install "$(python deploy/docker/requirements.py dev | grep '^grpcio-tools')" \
 && VENV=/opt/venv protos/generate.sh \
 && pip uninstall -y grpcio-tools \
 && pip install --no-deps . \
 && python -c "import torchrec, fbgemm_gpu, onnxruntime, userembed.commands.train, embed_server._proto"

FROM ${PYTHON_IMAGE} AS runtime
# libgomp: OpenMP runtime of the fbgemm CPU kernels.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /workspace && chown app:app /workspace
COPY --from=build /opt/venv /opt/venv
COPY --chown=app:app feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    USEREMBED_HOME=/workspace \
    USEREMBED_FEATURE_REPO=/app/feature_repo
WORKDIR /workspace
# The workspace (data, Feast registry, runs, model registry) is a volume shared with the server.
VOLUME ["/workspace"]
USER app
CMD ["userembed", "--help"]
