# The coordinator's Flower SuperLink. Its ServerApp process imports fednano's server code (torch, Opacus,
# xgboost-cpu), so the project is installed here too. No key or certificate is in the image: compose.yaml
# mounts them read-only.
#
#   git archive HEAD | docker build -f docker/server.Dockerfile -t fednano-server -
#
# Layers: every line up to and including the dependency install is client.Dockerfile's (see there and
# docker/README.md), so the second image's build reuses the first one's dependency layer; only the code differs.
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

# The coordinator's code: seconds to install, the only layers a code change rebuilds.
WORKDIR /tmp/fednano
COPY pyproject.toml README.md ./
COPY fednano/ fednano/
COPY shared/ shared/
COPY server/ server/
COPY strategies/ strategies/
RUN /opt/fednano/bin/pip install --no-cache-dir --no-index --no-deps --no-build-isolation . \
    && rm -rf /tmp/fednano \
    && mkdir -p /var/lib/fednano/flwr \
    && chown -R fednano:fednano /var/lib/fednano

WORKDIR /var/lib/fednano
USER 10001:10001
# Fleet and Control APIs share this port (Flower 1.42).
EXPOSE 9093
ENTRYPOINT ["flower-superlink"]
CMD ["--help"]
