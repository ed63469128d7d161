# A hospital's Flower SuperNode with fednano's ClientApp and everything it imports (torch CPU, Opacus,
# xgboost-cpu): the hospital's packages only (shared/, client/, and the fednano CLI for validate, recommend,
# serve and ledger), never the coordinator's. No key, certificate or data is in the image: compose.yaml
# mounts them read-only; FEDNANO_STATE_DIR (the privacy ledger's head copy, kept apart from the data) is a
# volume of its own.
#
#   git archive HEAD | docker build -f docker/client.Dockerfile -t fednano-client -
#
# BASE_IMAGE: any Debian-like image with Python 3.11 (python3 -m venv must work); the official slim image by
# default, a locally made one where no registry can be reached (docker/README.md).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where pip finds torch's CPU-only build (PyPI's torch is the multi-GB CUDA one). WHEELS_ONLY=true installs
# from docker/wheels/ alone (a wheelhouse made with `pip wheel`), for builds with no index at all.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_ONLY=false

ENV PATH=/opt/fednano/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/var/lib/fednano/flwr \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDNANO_STATE_DIR=/var/lib/fednano/state

WORKDIR /tmp/fednano
COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml README.md ./
COPY fednano/ fednano/
COPY shared/ shared/
COPY client/ client/
RUN if [ "$WHEELS_ONLY" = true ]; then index="--no-index"; else index="--extra-index-url=$TORCH_INDEX_URL"; fi \
    && python3 -m venv /opt/fednano \
    && /opt/fednano/bin/pip install --no-cache-dir --find-links=/tmp/wheels "$index" "torch==2.13.0" . \
    && rm -rf /tmp/wheels /tmp/fednano \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin fednano \
    && mkdir -p /var/lib/fednano/flwr /var/lib/fednano/state \
    && chown -R fednano:fednano /var/lib/fednano

WORKDIR /var/lib/fednano
USER 10001:10001
ENTRYPOINT ["flower-supernode"]
CMD ["--help"]
