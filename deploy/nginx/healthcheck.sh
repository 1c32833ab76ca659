#!/bin/sh
# The gateway container's health check: a grpc.health.v1.Health/Check (service "", the server as a whole) sent
# through the gateway over TLS and HTTP/2, so it is healthy when it listens, its certificate verifies, and it routes
# to a replica that answers SERVING (health needs no token).
# The request is an empty HealthCheckRequest in gRPC framing (5 bytes: not compressed, length 0); the expected
# answer is HealthCheckResponse{status: SERVING} (00 00000002 08 01).
# The certificate is checked against GATEWAY_TLS_CA (default /run/secrets/tls-ca) for the name localhost; without
# that file, against nothing (--insecure: the check then only says that TLS and routing work).
set -eu
port="${GATEWAY_LISTEN:-0.0.0.0:8080}"
port="${port##*:}"
ca="${GATEWAY_TLS_CA:-/run/secrets/tls-ca}"
if [ -r "$ca" ]; then
    verify="--cacert $ca"
else
    verify="--insecure"
fi
# shellcheck disable=SC2086
answer="$(printf '\000\000\000\000\000' \
    | curl --silent --show-error --max-time "${1:-4}" --http2 $verify \
        --resolve "localhost:$port:127.0.0.1" \
        -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- \
        "https://localhost:$port/grpc.health.v1.Health/Check" \
    | od -An -tx1 | tr -d ' \n')"
if [ "$answer" = "00000000020801" ]; then
    exit 0
fi
echo "gateway health: expected SERVING, got '${answer}'" >&2
exit 1
