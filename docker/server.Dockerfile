# The coordinator's Flower SuperLink. Its ServerApp process imports fednano's server code (torch, Opacus,
# xgboost-cpu), so the project is installed here too; the layers above ENTRYPOINT are the client image's,
# so the second build reuses them. No key or certificate is in the image: compose.yaml mounts them read-only.
#
#   git archive HEAD | docker build -f docker/server.Dockerfile -t fednano-server -
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_ONLY=false

ENV PATH=/opt/fednano/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/var/lib/fednano/flwr \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

WORKDIR /tmp/fednano
COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml README.md ./
COPY fednano/ fednano/
COPY shared/ shared/
COPY server/ server/
COPY strategies/ strategies/
RUN if [ "$WHEELS_ONLY" = true ]; then index="--no-index"; else index="--extra-index-url=$TORCH_INDEX_URL"; fi \
    && python3 -m venv /opt/fednano \
    && /opt/fednano/bin/pip install --no-cache-dir --find-links=/tmp/wheels "$index" "torch==2.13.0" . \
    && rm -rf /tmp/wheels /tmp/fednano \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin fednano \
    && mkdir -p /var/lib/fednano/flwr \
    && chown -R fednano:fednano /var/lib/fednano

WORKDIR /var/lib/fednano
USER 10001:10001
# Fleet and Control APIs share this port (Flower 1.42).
EXPOSE 9093
ENTRYPOINT ["flower-superlink"]
CMD ["--help"]
