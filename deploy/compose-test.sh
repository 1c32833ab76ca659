#!/usr/bin/env bash
# make compose-test: the real docker-compose.yml end to end, under Docker (`docker compose`) or podman
# (`podman-compose` or `podman compose`), whichever is here.
#
# Builds the stack's images on the Dockerfiles' base images (the official ones by default, pulled as any
# `docker compose build` would), makes this run's secrets with deploy/credentials.py (CA and gateway certificate,
# token, state keys, Redis password), brings up redis, replica-1, replica-2 and the gateway under a project name of
# its own and free GATEWAY_PORT and GATEWAY_HTTP_PORT, waits until every container's own health check passes (the replicas'
# `python -m lstm_server.healthcheck`, the gateway's healthcheck.sh, redis-cli ping), then runs
# tests/deploy/test_compose.py through the gateway's published port. On exit it removes what it started, its
# secrets and the images it built.
#
# Where neither engine can run it prints `compose-test: SKIPPED: <reason>` and exits 0. An engine that runs but
# cannot pull a base image fails (exit 1), naming the image and the settings below.
#
# Settings, from the environment or as make variables (deploy/README.md):
#   COMPOSE_TEST_ENGINE=docker|podman  the engine; default: docker if its daemon answers, else podman
#   COMPOSE_TEST_KEEP_IMAGES=1         keep the images it built
#   COMPOSE_TEST_UP_TIMEOUT_S          how long the stack may take to become healthy (default 240)
#   PYTHON_BASE_IMAGE, DEBIAN_BASE_IMAGE  other base images (docker-compose.yml reads them)
# Opt-in, for a machine without a container registry or behind a TLS-intercepting proxy (CI's: .ci/run):
#   COMPOSE_TEST_LOCAL_BASE=1          build every image on localhost/lstm-base:bookworm, made once with debootstrap
#                                      (root) from COMPOSE_TEST_DEBIAN_MIRROR (default http://deb.debian.org/debian)
#   COMPOSE_TEST_CA=PATH               CA certificates (a PEM file, or a folder of *.crt and *.pem) put into the base
#                                      images (a layer on top, kept cached), so that pip and apt over HTTPS verify
#   COMPOSE_TEST_PODMAN_DIR=DIR        podman with settings of its own written into DIR (ulimits within this shell's
#                                      hard limits, runc, cgroupfs, a file event log) and its image store in DIR
#   COMPOSE_TEST_INSTALL=1             install what is missing with apt-get (root): podman, podman-compose and runc
#                                      when no engine runs; debootstrap for COMPOSE_TEST_LOCAL_BASE
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
START=$SECONDS

log() { printf 'compose-test [%4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
skip() {
    echo "compose-test: SKIPPED: $*"
    exit 0
}
fail() {
    echo "compose-test: FAILED: $*" >&2
    exit 1
}

WANT_ENGINE="${COMPOSE_TEST_ENGINE:-auto}"
LOCAL_BASE="${COMPOSE_TEST_LOCAL_BASE:-}"
[[ "$LOCAL_BASE" == 0 ]] && LOCAL_BASE=""
CA="${COMPOSE_TEST_CA:-}"
PODMAN_DIR="${COMPOSE_TEST_PODMAN_DIR:-}"
[[ -z "$PODMAN_DIR" || "$PODMAN_DIR" == /* ]] || PODMAN_DIR="$ROOT/$PODMAN_DIR"
INSTALL="${COMPOSE_TEST_INSTALL:-}"
[[ "$INSTALL" == 0 ]] && INSTALL=""
MIRROR="${COMPOSE_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
UP_TIMEOUT_S="${COMPOSE_TEST_UP_TIMEOUT_S:-240}"
LOCAL_BASE_IMAGE=localhost/lstm-base:bookworm
PROJECT="lstmct$$"
SERVICES=(redis replica-1 replica-2 gateway)
PYTHON="$ROOT/.venv/bin/python"

case "$WANT_ENGINE" in
auto | docker | podman) ;;
*) fail "COMPOSE_TEST_ENGINE=$WANT_ENGINE: expected docker or podman" ;;
esac

# This run's log and secrets, in a folder git ignores by itself (as deploy/secrets/ does).
WORK="$ROOT/.compose-test"
mkdir -p "$WORK/logs"
[[ -f "$WORK/.gitignore" ]] || echo '*' >"$WORK/.gitignore"
LOG="$WORK/logs/$PROJECT.log"
: >"$LOG"
ls -t "$WORK"/logs/*.log | tail -n +11 | xargs -r rm -f # keep the last ten runs' logs
SECRETS_DIR="$WORK/secrets-$PROJECT"

[[ -x "$PYTHON" ]] || fail ".venv is missing: run make install"

# -- opt-in: podman's own settings and image store (COMPOSE_TEST_PODMAN_DIR) ------------------------------------
if [[ -n "$PODMAN_DIR" ]]; then
    mkdir -p "$PODMAN_DIR"
    # podman's default limits may be above what the machine allows (every container then fails with
    # `setrlimit RLIMIT_NOFILE: Operation not permitted`): cap them at this shell's hard limits.
    nofile="$(ulimit -Hn)"
    [[ "$nofile" == unlimited || "$nofile" -gt 1048576 ]] && nofile=1048576
    nproc="$(ulimit -Hu)"
    [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
    cat >"$PODMAN_DIR/containers.conf" <<EOF
# Written by deploy/compose-test.sh (COMPOSE_TEST_PODMAN_DIR).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat >"$PODMAN_DIR/storage.conf" <<EOF
# Written by deploy/compose-test.sh (COMPOSE_TEST_PODMAN_DIR).
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/storage"
runroot = "$PODMAN_DIR/run"
EOF
    export CONTAINERS_CONF="$PODMAN_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf"
    log "podman settings and image store in $PODMAN_DIR (COMPOSE_TEST_PODMAN_DIR)"
fi

# -- the engine -------------------------------------------------------------------------------------------------
ENGINE=""
COMPOSE=()
REASONS=()

find_docker() {
    if ! command -v docker >/dev/null; then
        REASONS+=("docker: not installed")
    elif docker --version 2>/dev/null | grep -qi podman; then
        REASONS+=("docker: is podman's docker command")
    elif ! docker info >>"$LOG" 2>&1; then
        REASONS+=("docker: no daemon answers (docker info fails)")
    elif docker compose version >>"$LOG" 2>&1; then
        ENGINE=docker COMPOSE=(docker compose)
    elif ! command -v docker-compose >/dev/null; then
        REASONS+=("docker: no compose (neither the docker compose plugin nor docker-compose)")
    elif [[ "$(docker-compose version --short 2>>"$LOG")" =~ ^v?[01]\. ]]; then
        # Compose 1.x predates the top-level `name` (and is no longer maintained): Compose v2 is needed.
        REASONS+=("docker: docker-compose $(docker-compose version --short 2>/dev/null) is too old (Compose v2 needed)")
    else
        ENGINE=docker COMPOSE=(docker-compose)
    fi
}

find_podman() {
    if ! command -v podman >/dev/null; then
        REASONS+=("podman: not installed")
    elif ! podman info >>"$LOG" 2>&1; then
        REASONS+=("podman: podman info fails (see $LOG)")
    elif command -v podman-compose >/dev/null && podman-compose version >>"$LOG" 2>&1; then
        ENGINE=podman COMPOSE=(podman-compose)
    elif podman compose version >>"$LOG" 2>&1; then
        ENGINE=podman COMPOSE=(podman compose)
    else
        REASONS+=("podman: no compose (neither podman-compose nor podman compose)")
    fi
}

find_engine() {
    ENGINE="" COMPOSE=() REASONS=()
    if [[ "$WANT_ENGINE" != podman ]]; then find_docker; fi
    if [[ -z "$ENGINE" && "$WANT_ENGINE" != docker ]]; then find_podman; fi
}

apt_install() {
    [[ $(id -u) -eq 0 ]] || fail "COMPOSE_TEST_INSTALL: installing $* needs root"
    command -v apt-get >/dev/null || fail "COMPOSE_TEST_INSTALL: no apt-get to install $*"
    log "installing $* with apt-get (COMPOSE_TEST_INSTALL; log: $LOG)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        fail "apt-get install $* failed (see $LOG)"
    fi
}

find_engine
if [[ -z "$ENGINE" && -n "$INSTALL" && "$WANT_ENGINE" != docker ]]; then
    missing=()
    for tool in podman podman-compose runc; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
        find_engine
    fi
fi
if [[ -z "$ENGINE" ]]; then
    reasons="$(printf '%s; ' "${REASONS[@]}")"
    skip "no container engine with compose can run here (${reasons%; })"
fi
engine() { "$ENGINE" "$@"; }
if ((${#REASONS[@]})); then log "not docker: ${REASONS[*]}"; fi
log "engine: $ENGINE, compose: ${COMPOSE[*]} (log: $LOG)"
if [[ "$ENGINE" == podman ]]; then
    # Keep the Dockerfiles' HEALTHCHECK in the images (podman's default OCI format drops it).
    export BUILDAH_FORMAT=docker
fi

# -- the base images --------------------------------------------------------------------------------------------
# The defaults are the Dockerfiles' own (docker-compose.yml passes the same ones: tests/deploy/test_compose_file.py).
dockerfile_base() { sed -n 's/^ARG BASE_IMAGE=//p' "deploy/$1.Dockerfile"; }
PYTHON_BASE_IMAGE="${PYTHON_BASE_IMAGE:-$(dockerfile_base server)}"
DEBIAN_BASE_IMAGE="${DEBIAN_BASE_IMAGE:-$(dockerfile_base gateway)}"

image_present() { engine image inspect "$1" >/dev/null 2>&1; }

build_local_base() {
    [[ $(id -u) -eq 0 ]] || fail "COMPOSE_TEST_LOCAL_BASE needs root (debootstrap)"
    if ! command -v debootstrap >/dev/null; then
        [[ -n "$INSTALL" ]] || fail "COMPOSE_TEST_LOCAL_BASE needs debootstrap (or COMPOSE_TEST_INSTALL=1)"
        apt_install debootstrap
    fi
    local rootfs
    rootfs="$(mktemp -d "$WORK/rootfs.XXXXXX")"
    log "building the base image $LOCAL_BASE_IMAGE: debootstrap bookworm from $MIRROR (COMPOSE_TEST_LOCAL_BASE)"
    if ! debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$MIRROR" >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        rm -rf "$rootfs"
        fail "debootstrap failed (see $LOG)"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | engine import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE_IMAGE" >>"$LOG" 2>&1
    rm -rf "$rootfs"
    log "base image $LOCAL_BASE_IMAGE ready"
}

pull() {
    local output
    log "pulling $1"
    if ! output="$(engine pull "$1" 2>&1)"; then
        printf '%s\n' "$output" >>"$LOG"
        printf '%s\n' "$output" | tail -n 3 | sed "s/^/compose-test: $ENGINE pull: /" >&2
        fail "cannot pull the base image $1 with $ENGINE. Without a registry, build on a local base image" \
            "(COMPOSE_TEST_LOCAL_BASE=1) or set PYTHON_BASE_IMAGE and DEBIAN_BASE_IMAGE to images you have;" \
            "behind a TLS-intercepting proxy, COMPOSE_TEST_CA (deploy/README.md, make compose-test)"
    fi
    printf '%s\n' "$output" >>"$LOG"
}

# A layer with the CA certificates of COMPOSE_TEST_CA on top of a base image; prints the new image's name.
with_ca() {
    local base="$1" context tag file n=0
    context="$(mktemp -d "$WORK/ca.XXXXXX")"
    for file in "${CA_FILES[@]}"; do
        n=$((n + 1))
        cp "$file" "$context/compose-test-ca-$n.crt"
    done
    tag="localhost/lstm-base-ca:$(cat "$context"/*.crt | sha256sum | cut -c1-12)-$(printf '%s' "$base" | sha256sum | cut -c1-12)"
    if image_present "$tag"; then
        log "base image $tag ($base with COMPOSE_TEST_CA) cached"
    else
        # update-ca-certificates where the image has it; otherwise the certificates wait in
        # /usr/local/share/ca-certificates for the ca-certificates package, whose installation adds them.
        cat >"$context/Dockerfile" <<EOF
FROM $base
USER root
COPY *.crt /usr/local/share/ca-certificates/
RUN if command -v update-ca-certificates >/dev/null; then update-ca-certificates; fi
EOF
        log "adding the CA certificates of $CA to $base: $tag"
        engine build -t "$tag" "$context" >>"$LOG" 2>&1 || {
            rm -rf "$context"
            fail "could not add the CA certificates to $base (see $LOG)"
        }
    fi
    rm -rf "$context"
    printf '%s\n' "$tag"
}

if [[ -n "$LOCAL_BASE" ]]; then
    image_present "$LOCAL_BASE_IMAGE" && log "base image $LOCAL_BASE_IMAGE cached" || build_local_base
    PYTHON_BASE_IMAGE="$LOCAL_BASE_IMAGE" DEBIAN_BASE_IMAGE="$LOCAL_BASE_IMAGE"
else
    for image in "$PYTHON_BASE_IMAGE" "$DEBIAN_BASE_IMAGE"; do
        image_present "$image" || pull "$image"
    done
fi
if [[ -n "$CA" ]]; then
    CA_FILES=()
    if [[ -d "$CA" ]]; then
        for file in "$CA"/*.crt "$CA"/*.pem; do
            [[ -f "$file" ]] && CA_FILES+=("$file")
        done
    elif [[ -f "$CA" ]]; then
        CA_FILES=("$CA")
    fi
    ((${#CA_FILES[@]})) || fail "COMPOSE_TEST_CA=$CA: no certificate there (a PEM file, or a folder of *.crt, *.pem)"
    python_ca="$(with_ca "$PYTHON_BASE_IMAGE")"
    if [[ "$DEBIAN_BASE_IMAGE" == "$PYTHON_BASE_IMAGE" ]]; then
        DEBIAN_BASE_IMAGE="$python_ca"
    else
        DEBIAN_BASE_IMAGE="$(with_ca "$DEBIAN_BASE_IMAGE")"
    fi
    PYTHON_BASE_IMAGE="$python_ca"
fi
export PYTHON_BASE_IMAGE DEBIAN_BASE_IMAGE
log "base images: $PYTHON_BASE_IMAGE (servers), $DEBIAN_BASE_IMAGE (gateway, redis)"

# -- the stack --------------------------------------------------------------------------------------------------
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
project_containers() { engine ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}'; }
# Images compose built for the project: PROJECT_SERVICE (podman-compose) or PROJECT-SERVICE (docker compose).
project_images() {
    engine images --format '{{.Repository}}' | grep -E "(^|/)${PROJECT}[-_]${1:-[^/]+}\$" || true
}

dump_logs() {
    echo "---- compose-test: containers of $PROJECT ----" >&2
    engine ps -a --filter "label=com.docker.compose.project=$PROJECT" >&2 || true
    local name
    for name in $(project_containers); do
        echo "---- logs of $name (last 40 lines) ----" >&2
        engine logs --tail 40 "$name" >&2 2>&1 || true
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
        { echo "---- logs of $name ----"; engine logs "$name" 2>&1; } >>"$LOG"
    done
    log "tearing down $PROJECT"
    compose down -v >>"$LOG" 2>&1
    project_containers | xargs -r "$ENGINE" rm -f >>"$LOG" 2>&1
    engine network ls --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Name}}' |
        xargs -r "$ENGINE" network rm >>"$LOG" 2>&1
    rm -rf "$SECRETS_DIR"
    if [[ "${COMPOSE_TEST_KEEP_IMAGES:-0}" != 1 ]]; then
        project_images | xargs -r "$ENGINE" rmi -f >>"$LOG" 2>&1
        # The build's intermediate layers, where the image store is this script's alone.
        if [[ -n "$PODMAN_DIR" && "$ENGINE" == podman ]]; then podman image prune -f >>"$LOG" 2>&1; fi
    else
        log "COMPOSE_TEST_KEEP_IMAGES=1: kept $(project_images | wc -l) images of $PROJECT"
    fi
    log "done (exit $rc); log: $LOG"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GATEWAY_PORT="$(free_port)"
GATEWAY_HTTP_PORT="$(free_port)"
export GATEWAY_PORT GATEWAY_HTTP_PORT
GATEWAY="127.0.0.1:$GATEWAY_PORT"

# This run's secrets (an absolute path: podman-compose 1.0.3 hands secret files to podman as they are written).
"$PYTHON" deploy/credentials.py "$SECRETS_DIR" --server-names gateway >>"$LOG" 2>&1
export LSTM_SECRETS_DIR="$SECRETS_DIR"
log "secrets for this run in $SECRETS_DIR"

# The build's error lines, and a hint where HTTPS failed on a certificate (a TLS-intercepting proxy).
build_failed() {
    tail -n "+$build_line" "$LOG" | grep -E '(^|[[:space:]])(Error|ERROR|error)[: ]' | head -n 8 >&2 || true
    if tail -n "+$build_line" "$LOG" | grep -q CERTIFICATE_VERIFY_FAILED; then
        echo "compose-test: HTTPS inside the build failed to verify a certificate: behind a proxy with its own CA," \
            "set COMPOSE_TEST_CA (deploy/README.md)" >&2
    fi
    fail "$*"
}
log "building ${SERVICES[*]} (project $PROJECT)"
build_start=$SECONDS
build_line=$(($(wc -l <"$LOG") + 1))
compose build "${SERVICES[@]}" >>"$LOG" 2>&1 || build_failed "${COMPOSE[*]} build failed (see $LOG)"
for service in "${SERVICES[@]}"; do
    # podman-compose 1.0.3 carries on, and exits 0, after a failed build.
    [[ -n "$(project_images "$service")" ]] || build_failed "the image of $service was not built (see $LOG)"
done
log "built in $((SECONDS - build_start))s"

up_start=$SECONDS
log "starting ${SERVICES[*]}; gateway on $GATEWAY"
compose up -d --no-build "${SERVICES[@]}" >>"$LOG" 2>&1 || fail "${COMPOSE[*]} up failed (see $LOG)"

# The containers' own health checks (docker-compose.yml): podman 4 without systemd does not run them by itself,
# so they are run here; Docker runs them and reports the result.
healthy() {
    if [[ "$ENGINE" == podman ]]; then
        podman healthcheck run "$1" >>"$LOG" 2>&1
    else
        [[ "$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>>"$LOG")" == healthy ]]
    fi
}
waiting=()
while :; do
    mapfile -t containers < <(project_containers)
    waiting=()
    for name in "${containers[@]}"; do
        healthy "$name" || waiting+=("$name")
    done
    if ((${#containers[@]} == ${#SERVICES[@]} && ${#waiting[@]} == 0)); then
        break
    fi
    if ((SECONDS - up_start > UP_TIMEOUT_S)); then
        fail "not healthy within ${UP_TIMEOUT_S}s: ${waiting[*]:-} (${#containers[@]} of ${#SERVICES[@]} containers)"
    fi
    sleep 2
done
log "healthy after $((SECONDS - up_start))s: ${containers[*]}"

log "running tests/deploy/test_compose.py"
test_start=$SECONDS
LSTM_COMPOSE_GATEWAY="$GATEWAY" LSTM_COMPOSE_HTTP="https://127.0.0.1:$GATEWAY_HTTP_PORT" \
    LSTM_COMPOSE_PROJECT="$PROJECT" LSTM_COMPOSE_SECRETS="$SECRETS_DIR" \
    LSTM_COMPOSE_ENGINE="$ENGINE" "$PYTHON" -m pytest -p no:cacheprovider tests/deploy/test_compose.py
log "tests took $((SECONDS - test_start))s; total $((SECONDS - START))s"
