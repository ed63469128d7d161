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
#
# Layers: the dependencies (minutes: torch, xgboost, ...) are installed from requirements.txt alone, which the
# first stage extracts from pyproject.toml; the code comes after them, installed with --no-deps. A code change,
# or a pyproject change outside [project].dependencies, reuses the dependency layer (docker/README.md). Every
# line up to and including that install is the same in server.Dockerfile, so the two images share it.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS requirements
WORKDIR /tmp/fednano
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(p['build-system']['requires'] + p['project']['dependencies']))" > requirements.txt

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
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1

COPY docker/wheels/ /tmp/wheels/
COPY --from=requirements /tmp/fednano/requirements.txt /tmp/requirements.txt
RUN if [ "$WHEELS_ONLY" = true ]; then index="--no-index"; else index="--extra-index-url=$TORCH_INDEX_URL"; fi \
    && python3 -m venv /opt/fednano \
    && /opt/fednano/bin/pip install --no-cache-dir --find-links=/tmp/wheels "$index" "torch==2.13.0" \
       -r /tmp/requirements.txt \
    && rm -rf /tmp/wheels /tmp/requirements.txt \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin fednano

# The hospital's code: seconds to install, the only layers a code change rebuilds.
ENV FEDNANO_STATE_DIR=/var/lib/fednano/state
WORKDIR /tmp/fednano
COPY pyproject.toml README.md ./
COPY fednano/ fednano/
COPY shared/ shared/
COPY client/ client/
RUN /opt/fednano/bin/pip install --no-cache-dir --no-index --no-deps --no-build-isolation . \
    && rm -rf /tmp/fednano \
    && mkdir -p /var/lib/fednano/flwr /var/lib/fednano/state \
    && chown -R fednano:fednano /var/lib/fednano

WORKDIR /var/lib/fednano
USER 10001:10001
ENTRYPOINT ["flower-supernode"]
CMD ["--help"]
