# The gRPC server on an NVIDIA GPU (onnxruntime's CUDA execution provider). Build from the repository root:
#   docker build -f deploy/server-gpu.Dockerfile -t lstm-server-gpu .
#   docker run --gpus 1 -v "$PWD/models:/models:ro" -v "$PWD/deploy/secrets/auth-tokens:/run/secrets/auth-tokens:ro" \
#     -e LSTM_SERVER_AUTH_TOKENS=/run/secrets/auth-tokens -p 127.0.0.1:50051:50051 lstm-server-gpu
# or `docker compose --profile gpu up` (docker-compose.yml, service replica-gpu).
#
# Not built on the project's machines (no registry, no GPU there): written from onnxruntime's and NVIDIA's docs.
# onnxruntime-gpu 1.31 from PyPI is built against CUDA 13 and cuDNN 9 (its wheel's `cuda`/`cudnn` extras name
# nvidia-cuda-runtime ~= 13.0 and nvidia-cudnn-cu13 ~= 9.0), so the base is CUDA 13 with cuDNN 9; the host needs an
# NVIDIA driver for CUDA 13 (>= 580) and the NVIDIA container toolkit.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# ORT_DISABLE_TELEMETRY: onnxruntime (>= 1.29) sends usage telemetry from Linux by default; a server does not.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1

# The CUDA images have no Python: Ubuntu's python3 (3.12) and its venv module.
RUN set -eu; \
    if ! python3 -m venv /opt/venv 2>/dev/null; then \
        rm -rf /opt/venv; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
        python3 -m venv /opt/venv; \
    fi; \
    groupadd --system --gid 10001 lstm; \
    useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin lstm
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
COPY constraints.txt ./
COPY client/pyproject.toml client/
COPY server/pyproject.toml server/
# onnxruntime-gpu instead of onnxruntime. Both distributions install the same `onnxruntime` package, so they must
# not be installed together; lstm-server depends on `onnxruntime`. So the server's dependencies are read from its
# pyproject.toml, every one but onnxruntime (and lstm-client, installed from ./client) is installed at its pinned
# version, plus onnxruntime-gpu at the version constraints.txt pins for onnxruntime; then the two projects are
# installed with --no-deps. (`pip check` reports the server's onnxruntime requirement as missing: expected, the
# GPU build provides the same module.)
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    ort_version="$(sed -n 's/^onnxruntime==//p' constraints.txt)"; \
    test -n "$ort_version"; \
    python -c "import re, tomllib; deps = tomllib.load(open('server/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if re.split(r'[<>=!~;\[ ]', d)[0] not in ('onnxruntime', 'lstm-client')))" > server-deps.txt; \
    mkdir -p client/src server/src; \
    pip install -c constraints.txt ./client -r server-deps.txt "onnxruntime-gpu==${ort_version}"

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
    LSTM_SERVER_DEVICE=cuda
EXPOSE 50051 9090

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "lstm_server.healthcheck", "127.0.0.1:50051"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-server"]
