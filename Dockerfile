# syntax=docker/dockerfile:1
# The fedlora aggregator image: the [server] extra only (ONNX Runtime training CPU build,
# paho-mqtt, prometheus-client, kubernetes; no torch), run as a non-root user.
#
#   docker build -t fedlora-aggregator:0.1.0 .
#
# The Helm chart (helm/fedlora-aggregator) runs it with a read-only root file system and
# mounts server.yaml at /etc/fedlora, the state volume at /var/lib/fedlora and the bundle at /bundle.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY core ./core
COPY edge_client ./edge_client
COPY server ./server
RUN python -m venv /opt/fedlora \
 && /opt/fedlora/bin/pip install -c constraints.txt ".[server]" \
 && /opt/fedlora/bin/python -c "import server.cli, server.aggregator, server.leader, kubernetes, prometheus_client" \
 && if /opt/fedlora/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the aggregator image" >&2; exit 1; fi

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 fedlora \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedlora
COPY --from=build /opt/fedlora /opt/fedlora
ENV PATH=/opt/fedlora/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/fedlora
EXPOSE 9100
ENTRYPOINT ["fedlora-server"]
CMD ["--config", "/etc/fedlora/server.yaml"]
