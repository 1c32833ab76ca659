# The session-aware gRPC gateway: nginx (Debian's, 1.22) terminating TLS and hashing each call's x-session-id onto
# the replicas (deploy/nginx/gateway.conf.template). Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t lstm-gateway .
#   docker run -e GATEWAY_UPSTREAMS="replica-1:50051 replica-2:50051" -p 8080:8080 \
#     -v "$PWD/deploy/secrets/server.pem:/run/secrets/tls-cert:ro" -v "$PWD/deploy/secrets/server-key.pem:/run/secrets/tls-key:ro" \
#     -v "$PWD/deploy/secrets/ca.pem:/run/secrets/tls-ca:ro" lstm-gateway
# Configuration by environment: see deploy/nginx/entrypoint.sh (GATEWAY_LISTEN, GATEWAY_UPSTREAMS, GATEWAY_TLS_*, ...).
# No certificate is in the image: it is mounted (docker-compose.yml's secrets).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# nginx, envsubst (gettext-base) for the template, curl for the gRPC health check.
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx gettext-base curl; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10002 gateway; \
    useradd --system --uid 10002 --gid 10002 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin gateway

COPY deploy/nginx/gateway.conf.template /etc/lstm-gateway/gateway.conf.template
COPY deploy/nginx/entrypoint.sh deploy/nginx/healthcheck.sh /usr/local/lib/lstm-gateway/

# Not root: the listen port is above 1024 and everything nginx writes goes to GATEWAY_PREFIX.
USER 10002:10002
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_HTTP_LISTEN=0.0.0.0:8443 \
    GATEWAY_PREFIX=/tmp/nginx \
    GATEWAY_TLS_CERT=/run/secrets/tls-cert \
    GATEWAY_TLS_KEY=/run/secrets/tls-key \
    GATEWAY_TLS_CA=/run/secrets/tls-ca
EXPOSE 8080 8443

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["sh", "/usr/local/lib/lstm-gateway/healthcheck.sh"]

# nginx stops at once on SIGTERM (fast shutdown; SIGQUIT would wait for open streams, up to an hour).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sh", "/usr/local/lib/lstm-gateway/entrypoint.sh"]
