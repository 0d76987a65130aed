# syntax=docker/dockerfile:1
# The fedlora aggregator image: the [server] extra only (ONNX Runtime training CPU build,
# paho-mqtt, prometheus-client, kubernetes; no torch), run as a non-root user.
#
#   docker build -t fedlora-aggregator:0.1.0 .
#   buildah bud -t fedlora-aggregator:0.1.0 .     # without a Docker engine: docs/operations.md
#
# The Helm chart (helm/fedlora-aggregator) runs it with a read-only root file system and
# mounts server.yaml at /etc/fedlora, the state volume at /var/lib/fedlora and the bundle at /bundle.
# tests/test_image.py builds this file and runs the image that way, with devices completing a round.
#
# Build arguments (--build-arg NAME=VALUE):
#   PYTHON_VERSION  CPython of the default base image: 3.11 or 3.12 (onnxruntime-training 1.19.2,
#                   the last release with the training API, has no wheels for 3.13). Default 3.11.
#   BASE_IMAGE      the base image: any Debian-like image whose `python` has venv and ensurepip.
#                   Default python:${PYTHON_VERSION}-slim.
#   VERSION         org.opencontainers.image.version; keep it pyproject.toml's version and the
#                   chart's appVersion (the test checks the default). Default 0.1.0.
#   REVISION        org.opencontainers.image.revision: the commit built, e.g. $(git rev-parse HEAD).
#   SOURCE          org.opencontainers.image.source: where the code lives (your repository's URL).
#   CREATED         org.opencontainers.image.created: RFC 3339 build time, e.g. $(date -u +%FT%TZ).
#   PIP_INDEX_URL, PIP_CERT
#                   pip's own settings for the build stage only (a package index or proxy, and the CA
#                   bundle that trusts it, e.g. with -v /etc/ssl/certs:/etc/ssl/certs:ro); unset by default,
#                   and kept in no layer of the image.
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY edge_client ./edge_client
COPY server ./server
COPY scripts/slim_venv.py ./scripts/
# Then out goes what the aggregator never imports (about 250 MB), with whatever only that needed
# (scripts/slim_venv.py): ONNX Runtime's build-host dependencies (here it only reads checkpoints
# and evaluates), the Hugging Face Hub client tokenizers declares (nothing is downloaded at run
# time), the kubernetes package's asyncio client (the aggregator uses the synchronous one) and
# its aiohttp, and the installers. The console scripts of the packages not copied (simulator/,
# export/) go too. The imports below fail the build if a cut went too far; tests/test_image.py
# runs a whole round in the image.
# Byte code is compiled after the cut, for what stays only (the root file system is read-only at
# run time, so nothing is compiled later).
RUN python -m venv /opt/fedlora \
 && /opt/fedlora/bin/pip install --no-compile -c constraints.txt ".[server]" \
 && /opt/fedlora/bin/python scripts/slim_venv.py \
      sympy onnx protobuf h5py cerberus flatbuffers huggingface_hub aiohttp aiohttp-retry setuptools pip \
 && rm -rf /opt/fedlora/lib/python*/site-packages/kubernetes/aio /opt/fedlora/bin/fedlora /opt/fedlora/bin/fedlora-export \
 && /opt/fedlora/bin/python -m compileall -q -j 0 /opt/fedlora/lib \
 && /opt/fedlora/bin/python -c "import server.cli, server.aggregator, server.leader, server.k8s, server.peft_adapter, server.privacy, server.robust, dp_accounting.rdp, \
server.strategies, edge_client.data, tokenizers, safetensors, zstandard, kubernetes.client, kubernetes.config; \
from edge_client.runtime import training_api; training_api()" \
 && if /opt/fedlora/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the aggregator image" >&2; exit 1; fi

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE=""
ARG CREATED=""
LABEL org.opencontainers.image.title="fedlora-aggregator" \
      org.opencontainers.image.description="fedlora aggregator: federated LoRA rounds over MQTT, Prometheus metrics, Kubernetes leader election" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
# /var/lib/fedlora is the state volume's mount point; made here too, so a plain `docker run` works.
RUN groupadd --system --gid 10001 fedlora \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedlora \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/fedlora
COPY --from=build /opt/fedlora /opt/fedlora
ENV PATH=/opt/fedlora/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/fedlora
EXPOSE 9100
ENTRYPOINT ["fedlora-server"]
CMD ["--config", "/etc/fedlora/server.yaml"]
