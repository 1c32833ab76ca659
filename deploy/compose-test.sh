#!/usr/bin/env bash
# make compose-test: the real docker-compose.yml under podman, end to end.
#
# Builds the images (on a local Debian base image made with debootstrap, since no container registry may be
# reachable), makes the stack's secrets for this run (deploy/credentials.py: CA and gateway certificate, token,
# state keys, Redis password; in .podman/, removed at the end), brings up redis, replica-1, replica-2 and the
# gateway, waits until the gateway answers a gRPC health check over TLS, runs every container's health check, then
# tests/deploy/test_compose.py (TLS and tokens, sticky sessions and failover when a replica is killed) through the
# gateway's published port. Everything it started is removed on exit, and the images it built too (KEEP_IMAGES=1
# keeps them); the base image stays cached in .podman/.
# Where podman cannot run (not root, no podman and no apt-get, `podman info` failing) it says why and exits 0.
#
# Environment: KEEP_IMAGES=1; LSTM_BASE_IMAGE (default localhost/lstm-base:bookworm, built when missing; set it to
# any Debian-like image you have, or leave PYTHON_BASE_IMAGE/DEBIAN_BASE_IMAGE to the official images by setting
# LSTM_BASE_IMAGE=official); COMPOSE_TEST_UP_TIMEOUT_S (default 240).
# Podman's settings for this machine (shared/CONTAINERS.md) are written to .podman/, which also holds the image store.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
START=$SECONDS

log() { printf 'compose-test [%4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
skip() {
    echo "compose-test: SKIPPED: $*"
    exit 0
}

PODMAN_DIR="$ROOT/.podman"
BASE_IMAGE="${LSTM_BASE_IMAGE:-localhost/lstm-base:bookworm}"
PROJECT="lstmct$$"
UP_TIMEOUT_S="${COMPOSE_TEST_UP_TIMEOUT_S:-240}"
SERVICES=(redis replica-1 replica-2 gateway)
PYTHON="$ROOT/.venv/bin/python"
SECRETS_DIR="$PODMAN_DIR/secrets-$PROJECT"
mkdir -p "$PODMAN_DIR/logs"
LOG="$PODMAN_DIR/logs/$PROJECT.log"
: >"$LOG"
ls -t "$PODMAN_DIR"/logs/*.log | tail -n +11 | xargs -r rm -f  # keep the last ten runs' logs

[[ -x "$PYTHON" ]] || {
    echo "compose-test: .venv is missing: run make install" >&2
    exit 1
}

# -- tools ------------------------------------------------------------------------------------------------------
missing=()
for tool in podman podman-compose runc; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [[ "$BASE_IMAGE" == localhost/lstm-base:* ]] && ! command -v debootstrap >/dev/null; then
    missing+=(debootstrap)
fi
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || skip "${missing[*]} not installed, and not root to install them with apt-get"
    command -v apt-get >/dev/null || skip "${missing[*]} not installed, and no apt-get to install them"
    log "installing podman podman-compose debootstrap runc with apt-get (log: $LOG)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        podman podman-compose debootstrap runc; } >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        skip "apt-get install podman podman-compose debootstrap runc failed (see $LOG)"
    fi
fi
[[ $(id -u) -eq 0 ]] || skip "needs rootful podman (the settings in .podman/ are for root): run as root"

# -- podman's settings (shared/CONTAINERS.md): limits this machine allows, runc with cgroupfs, a file event log,
#    and an image store of our own in .podman/ --------------------------------------------------------------------
nofile="$(ulimit -Hn)"
[[ "$nofile" == unlimited || "$nofile" -gt 1048576 ]] && nofile=1048576
nproc="$(ulimit -Hu)"
[[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
cat >"$PODMAN_DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$PODMAN_DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/storage"
runroot = "$PODMAN_DIR/run"
EOF
export CONTAINERS_CONF="$PODMAN_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf"
# Keep the Dockerfiles' HEALTHCHECK in the images (podman's default OCI format drops it).
export BUILDAH_FORMAT=docker

if ! podman info >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    skip "podman info fails here (see $LOG)"
fi

# -- the local base image ---------------------------------------------------------------------------------------
debian_mirror() {
    # The Debian mirror apt uses for bookworm (one-line or deb822 sources), else deb.debian.org.
    python3 - <<'PY'
import glob, re
found = None
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    for line in text.splitlines():
        m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
        if m and not found:
            found = m.group(1)
    for stanza in re.split(r"\n\s*\n", text):
        uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
        suites = re.search(r"^Suites:(.*)$", stanza, re.M)
        if uris and suites and "bookworm" in suites.group(1).split() and not found:
            found = uris.group(1)
print(found or "http://deb.debian.org/debian")
PY
}

build_base_image() {
    local mirror rootfs
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d "$PODMAN_DIR/rootfs.XXXXXX")"
    log "building the base image $BASE_IMAGE: debootstrap bookworm from $mirror"
    if ! debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        rm -rf "$rootfs"
        echo "compose-test: debootstrap failed (see $LOG)" >&2
        return 1
    fi
    # This machine's egress proxy CA certificates, so that pip and apt over HTTPS work inside the builds.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    chroot "$rootfs" update-ca-certificates >>"$LOG" 2>&1
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >>"$LOG"
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE ready"
}

if [[ "$BASE_IMAGE" == official ]]; then
    log "using the Dockerfiles' default (official) base images"
elif podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE cached"
    export PYTHON_BASE_IMAGE="$BASE_IMAGE" DEBIAN_BASE_IMAGE="$BASE_IMAGE"
elif [[ "$BASE_IMAGE" == localhost/lstm-base:* ]]; then
    build_base_image
    export PYTHON_BASE_IMAGE="$BASE_IMAGE" DEBIAN_BASE_IMAGE="$BASE_IMAGE"
else
    export PYTHON_BASE_IMAGE="$BASE_IMAGE" DEBIAN_BASE_IMAGE="$BASE_IMAGE"
fi

# -- the stack --------------------------------------------------------------------------------------------------
compose() { podman-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
project_containers() { podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}'; }

dump_logs() {
    echo "---- compose-test: containers of $PROJECT ----" >&2
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" >&2 || true
    local name
    for name in $(project_containers); do
        echo "---- logs of $name (last 40 lines) ----" >&2
        podman logs --tail 40 "$name" >&2 2>&1 || true
    done
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2 || true
}

teardown() {
    local rc=$?
    trap - EXIT
    set +e
    if ((rc != 0)); then dump_logs; fi
    for name in $(project_containers); do
        { echo "---- logs of $name ----"; podman logs "$name" 2>&1; } >>"$LOG"
    done
    log "tearing down $PROJECT"
    compose down -v >>"$LOG" 2>&1
    project_containers | xargs -r podman rm -f >>"$LOG" 2>&1
    podman network ls --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Name}}' |
        xargs -r podman network rm -f >>"$LOG" 2>&1
    rm -rf "$SECRETS_DIR"
    if [[ "${KEEP_IMAGES:-0}" != 1 ]]; then
        podman images --format '{{.Repository}}:{{.Tag}}' | grep "/${PROJECT}_" | xargs -r podman rmi -f >>"$LOG" 2>&1
        podman image prune -f >>"$LOG" 2>&1  # the build's intermediate layers (the store is ours alone)
    else
        log "KEEP_IMAGES=1: kept $(podman images --format '{{.Repository}}' | grep -c "/${PROJECT}_") images of $PROJECT"
    fi
    log "done (exit $rc); log: $LOG"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

GATEWAY_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export GATEWAY_PORT
GATEWAY="127.0.0.1:$GATEWAY_PORT"

# This run's secrets (an absolute path: podman-compose 1.0.3 hands secret files to podman as they are written).
"$PYTHON" deploy/credentials.py "$SECRETS_DIR" --server-names gateway >>"$LOG" 2>&1
export LSTM_SECRETS_DIR="$SECRETS_DIR"
log "secrets for this run in $SECRETS_DIR"

log "building ${SERVICES[*]} (project $PROJECT; log: $LOG)"
build_start=$SECONDS
if ! compose build "${SERVICES[@]}" >>"$LOG" 2>&1; then
    echo "compose-test: podman-compose build failed" >&2
    exit 1
fi
for service in "${SERVICES[@]}"; do
    podman image exists "localhost/${PROJECT}_${service}" || {
        echo "compose-test: the image of $service was not built" >&2
        exit 1
    }
done
log "built in $((SECONDS - build_start))s"

up_start=$SECONDS
log "starting ${SERVICES[*]}; gateway on $GATEWAY"
compose up -d --no-build "${SERVICES[@]}" >>"$LOG" 2>&1

gateway_serving() {
    "$PYTHON" - "$GATEWAY" "$SECRETS_DIR/ca.pem" <<'PY' 2>/dev/null
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

credentials = grpc.ssl_channel_credentials(open(sys.argv[2], "rb").read())
with grpc.secure_channel(sys.argv[1], credentials) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
}
until gateway_serving; do
    if ((SECONDS - up_start > UP_TIMEOUT_S)); then
        echo "compose-test: the gateway on $GATEWAY did not answer SERVING within ${UP_TIMEOUT_S}s" >&2
        exit 1
    fi
    sleep 2
done
log "gateway answers SERVING (TLS) after $((SECONDS - up_start))s"

# podman does not run health checks by itself here (no systemd timers): run each container's once.
for name in $(project_containers); do
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        podman healthcheck run "$name" >>"$LOG" 2>&1 && break
        if ((attempt == 10)); then
            echo "compose-test: the health check of $name fails" >&2
            exit 1
        fi
        sleep 3
    done
    log "healthy: $name"
done

log "running tests/deploy/test_compose.py"
test_start=$SECONDS
LSTM_COMPOSE_GATEWAY="$GATEWAY" LSTM_COMPOSE_PROJECT="$PROJECT" LSTM_COMPOSE_SECRETS="$SECRETS_DIR" \
    "$PYTHON" -m pytest -p no:cacheprovider tests/deploy/test_compose.py
log "tests took $((SECONDS - test_start))s; total $((SECONDS - START))s"
