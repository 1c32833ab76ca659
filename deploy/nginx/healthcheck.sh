#!/bin/sh
# The gateway container's health check: a grpc.health.v1.Health/Check (service "", the server as a whole) sent
# through the gateway, so it is healthy when it listens and routes to a replica that answers SERVING.
# The request is an empty HealthCheckRequest in gRPC framing (5 bytes: not compressed, length 0); the expected
# answer is HealthCheckResponse{status: SERVING} (00 00000002 08 01).
set -eu
port="${GATEWAY_LISTEN:-0.0.0.0:8080}"
port="${port##*:}"
answer="$(printf '\000\000\000\000\000' \
    | curl --silent --show-error --max-time "${1:-4}" --http2-prior-knowledge \
        -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- \
        "http://127.0.0.1:$port/grpc.health.v1.Health/Check" \
    | od -An -tx1 | tr -d ' \n')"
if [ "$answer" = "00000000020801" ]; then
    exit 0
fi
echo "gateway health: expected SERVING, got '${answer}'" >&2
exit 1
