#!/bin/sh
# The gateway container's entrypoint (deploy/gateway.Dockerfile): renders gateway.conf.template and runs nginx.
#
#   GATEWAY_LISTEN            address to listen on (default 0.0.0.0:8080)
#   GATEWAY_UPSTREAMS         the replicas, space-separated host:port (required), e.g. "replica-1:50051 replica-2:50051"
#   GATEWAY_HTTP_LISTEN       address to listen on for HTTP over TLS (default 0.0.0.0:8443)
#   GATEWAY_REPLICA_HTTP_PORT the replicas' HTTP port (default 8000: lstm-server's --http-port)
#   GATEWAY_TLS_CERT, GATEWAY_TLS_KEY  the gateway's certificate chain and private key, PEM (default
#                             /run/secrets/tls-cert and /run/secrets/tls-key: docker-compose.yml's secrets); reloaded
#                             when they change (checked every GATEWAY_RESOLVE_INTERVAL_S)
#   GATEWAY_PREFIX            writable folder for the rendered configuration, pid and temporary files (default /tmp/nginx)
#   GATEWAY_RESOLVE_TIMEOUT_S how long to wait for the replicas' names to resolve (default 120)
#   GATEWAY_MAX_FAILS, GATEWAY_FAIL_TIMEOUT  passive health of each upstream (default 1 and 1s): after that many
#                             failed connections a replica is skipped for that long (while every replica is skipped,
#                             calls fail: keep it short)
#   GATEWAY_RESOLVE_INTERVAL_S how often to look the replicas' names up again (default 5; 0: never), see below
set -eu

GATEWAY_LISTEN="${GATEWAY_LISTEN:-0.0.0.0:8080}"
GATEWAY_HTTP_LISTEN="${GATEWAY_HTTP_LISTEN:-0.0.0.0:8443}"
http_port="${GATEWAY_REPLICA_HTTP_PORT:-8000}"
GATEWAY_PREFIX="${GATEWAY_PREFIX:-/tmp/nginx}"
GATEWAY_UPSTREAMS="${GATEWAY_UPSTREAMS:?GATEWAY_UPSTREAMS must list the replicas, space-separated host:port}"
timeout_s="${GATEWAY_RESOLVE_TIMEOUT_S:-120}"
interval_s="${GATEWAY_RESOLVE_INTERVAL_S:-5}"
max_fails="${GATEWAY_MAX_FAILS:-1}"
fail_timeout="${GATEWAY_FAIL_TIMEOUT:-1s}"
template="${GATEWAY_TEMPLATE:-/etc/lstm-gateway/gateway.conf.template}"
GATEWAY_TLS_CERT="${GATEWAY_TLS_CERT:-/run/secrets/tls-cert}"
GATEWAY_TLS_KEY="${GATEWAY_TLS_KEY:-/run/secrets/tls-key}"

log() { echo "gateway-entrypoint: $*" >&2; }

# The gateway serves TLS only: without its certificate it does not start.
for file in "$GATEWAY_TLS_CERT" "$GATEWAY_TLS_KEY"; do
    if [ ! -r "$file" ]; then
        log "cannot read $file: mount the gateway's certificate and key (GATEWAY_TLS_CERT, GATEWAY_TLS_KEY);"
        log "docker-compose.yml takes them from deploy/secrets, made by: python3 deploy/credentials.py"
        exit 1
    fi
done

# nginx resolves upstream names once, at start, and refuses to start on a name that does not resolve. Compose
# starts the gateway as soon as the replicas' containers exist (podman-compose ignores health-gated depends_on),
# so wait here until every name resolves.
waited=0
for upstream in $GATEWAY_UPSTREAMS; do
    host="${upstream%:*}"
    case "$host" in \[*\]) continue ;; esac  # an IPv6 literal needs no lookup
    until getent hosts "$host" >/dev/null; do
        if [ "$waited" -ge "$timeout_s" ]; then
            log "upstream $host does not resolve after ${timeout_s}s; giving up"
            exit 1
        fi
        if [ $((waited % 10)) -eq 0 ]; then log "waiting for upstream $host to resolve (${waited}s)"; fi
        sleep 1
        waited=$((waited + 1))
    done
done

GATEWAY_UPSTREAMS_BLOCK=""
GATEWAY_HTTP_UPSTREAMS_BLOCK=""
for upstream in $GATEWAY_UPSTREAMS; do
    options="max_fails=$max_fails fail_timeout=$fail_timeout"
    line="server $upstream $options;"
    http_line="server ${upstream%:*}:$http_port $options;"
    if [ -z "$GATEWAY_UPSTREAMS_BLOCK" ]; then
        GATEWAY_UPSTREAMS_BLOCK="$line"
        GATEWAY_HTTP_UPSTREAMS_BLOCK="$http_line"
    else
        GATEWAY_UPSTREAMS_BLOCK="$GATEWAY_UPSTREAMS_BLOCK
        $line"
        GATEWAY_HTTP_UPSTREAMS_BLOCK="$GATEWAY_HTTP_UPSTREAMS_BLOCK
        $http_line"
    fi
done
export GATEWAY_LISTEN GATEWAY_PREFIX GATEWAY_UPSTREAMS GATEWAY_UPSTREAMS_BLOCK GATEWAY_TLS_CERT GATEWAY_TLS_KEY
export GATEWAY_HTTP_LISTEN GATEWAY_HTTP_UPSTREAMS_BLOCK

mkdir -p "$GATEWAY_PREFIX"
# Only these variables are substituted: nginx's own ($http_x_session_id, $request_id, ...) stay as they are.
# shellcheck disable=SC2016
envsubst '${GATEWAY_LISTEN} ${GATEWAY_PREFIX} ${GATEWAY_UPSTREAMS} ${GATEWAY_UPSTREAMS_BLOCK} ${GATEWAY_TLS_CERT} ${GATEWAY_TLS_KEY} ${GATEWAY_HTTP_LISTEN} ${GATEWAY_HTTP_UPSTREAMS_BLOCK}' \
    <"$template" >"$GATEWAY_PREFIX/nginx.conf"
nginx_() { nginx -e stderr -p "$GATEWAY_PREFIX" -c "$GATEWAY_PREFIX/nginx.conf" "$@"; }

# The replicas' addresses, one line per name; fails while a name does not resolve.
addresses() {
    for upstream in $GATEWAY_UPSTREAMS; do
        host="${upstream%:*}"
        case "$host" in \[*\]) continue ;; esac
        found="$(getent hosts "$host" | awk '{ print $1 }' | sort | tr '\n' ' ')"
        [ -n "$found" ] || return 1
        echo "$host $found"
    done
}

# nginx 1.22 looks the names up only when it (re)loads its configuration, but a replica that is restarted may
# come back on another address (podman and docker hand out a new one): then it would never get traffic again.
# So, in the background, look the names up again every GATEWAY_RESOLVE_INTERVAL_S seconds and reload nginx
# (graceful: running streams finish on the old workers) when an address changed and every name resolves. The same
# loop reloads nginx when the certificate or its key changed (renewal), which nginx also reads only at a (re)load.
tls_files() { cat "$GATEWAY_TLS_CERT" "$GATEWAY_TLS_KEY" 2>/dev/null | cksum; }
watch_addresses() {
    known="$(addresses)" || known=""
    known_tls="$(tls_files)"
    while sleep "$interval_s"; do
        current="$(addresses)" || continue
        current_tls="$(tls_files)"
        if [ "$current" != "$known" ] || [ "$current_tls" != "$known_tls" ]; then
            log "replica addresses or TLS files changed, reloading nginx: $(echo "$current" | tr '\n' ';')"
            if nginx_ -s reload; then
                known="$current"
                known_tls="$current_tls"
            fi
        fi
    done
}

nginx_ -t -q
if [ "$interval_s" != 0 ]; then watch_addresses & fi
log "listening on $GATEWAY_LISTEN (gRPC, TLS) and $GATEWAY_HTTP_LISTEN (HTTP, TLS), upstreams: $GATEWAY_UPSTREAMS"
exec nginx -e stderr -p "$GATEWAY_PREFIX" -c "$GATEWAY_PREFIX/nginx.conf" -g 'daemon off;'
