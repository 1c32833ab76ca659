# The gRPC server (lstm-server), CPU. Build from the repository root:
#   docker build -f deploy/server.Dockerfile -t lstm-server .
#   docker run -v "$PWD/models:/models:ro" -v "$PWD/deploy/secrets/auth-tokens:/run/secrets/auth-tokens:ro" \
#     -e LSTM_SERVER_AUTH_TOKENS=/run/secrets/auth-tokens -p 127.0.0.1:50051:50051 lstm-server
# It listens on 0.0.0.0, so it needs authentication (--auth-tokens or --tls-client-ca; --insecure-no-auth to go
# without, which serves anyone who reaches the port); with --session-store redis, the replicas' shared state keys.
# Only the client and server distributions are installed (no training, export or torch). The model repository is
# not in the image: mount it at /models. Any LSTM_SERVER_* variable or lstm-server flag configures the server.
#
# BASE_IMAGE: the official Python image by default; any Debian-like image works (a bare Debian gets python3 and
# python3-venv from apt), e.g. the debootstrapped base of `COMPOSE_TEST_LOCAL_BASE=1 make compose-test`.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# ORT_DISABLE_TELEMETRY: onnxruntime (>= 1.29) sends usage telemetry from Linux by default; a server does not.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1

# The virtual environment; python3 -m venv fails on a base without python (or without its venv module).
RUN set -eu; \
    if ! python3 -m venv /opt/venv 2>/dev/null; then \
        rm -rf /opt/venv; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
        python3 -m venv /opt/venv; \
    fi; \
    groupadd --system --gid 10001 lstm; \
    useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin lstm
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
# Dependencies in their own layer, rebuilt only when the pins or the pyproject files change: the two projects are
# installed once with empty packages (which pulls every dependency at its pinned version), then again, without
# dependencies, with their code. pip uses the system's CA bundle where there is one (on the official image the
# same Mozilla set as pip's own; a base image with a proxy's CA added, as `COMPOSE_TEST_CA` makes, holds that too).
COPY constraints.txt ./
COPY client/pyproject.toml client/
COPY server/pyproject.toml server/
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    mkdir -p client/src server/src; \
    pip install -c constraints.txt ./client ./server

COPY client/src client/src
COPY server/src server/src
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    pip install --no-deps --force-reinstall ./client ./server; \
    cd /; rm -rf /build

WORKDIR /
USER 10001:10001
ENV LSTM_SERVER_HOST=0.0.0.0 \
    LSTM_SERVER_PORT=50051 \
    LSTM_SERVER_MODELS=/models \
    LSTM_SERVER_METRICS_PORT=9090 \
    LSTM_SERVER_HTTP_PORT=8000
EXPOSE 50051 8000 9090

# grpc.health.v1 on the server's own port: healthy once the models are loaded and until SIGTERM (drain).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "lstm_server.healthcheck", "127.0.0.1:50051"]

# SIGTERM drains (NOT_SERVING, then running streams finish within LSTM_SERVER_GRACE_PERIOD_S) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-server"]
