# The session store: Redis (Debian's redis-server, 7.0) holding the sessions' states, so any replica can carry
# on a session another one served. Build from the repository root:
#   docker build -f deploy/redis.Dockerfile -t lstm-redis .
#   docker run -v "$PWD/deploy/secrets/redis.conf:/run/secrets/redis-conf:ro" lstm-redis
# It reads /run/secrets/redis-conf first (docker-compose.yml's secret, made by deploy/credentials.py), which holds
# `requirepass PASSWORD`: the password is never on a command line or in the environment.
# The official image (redis:7) works the same: in docker-compose.yml replace the service's build with `image: redis:7`.
# It is built from Debian here so that the whole stack builds from one base image where no registry is reachable
# (`COMPOSE_TEST_LOCAL_BASE=1 make compose-test`).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    install -d -o redis -g redis /data

USER redis
WORKDIR /data
VOLUME /data
EXPOSE 6379
# redis-cli reads the password from REDISCLI_AUTH (not from its command line).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["sh", "-c", "REDISCLI_AUTH=\"$(sed -n 's/^requirepass //p' /run/secrets/redis-conf)\" redis-cli -h 127.0.0.1 ping | grep -qx PONG"]

# Listens on every interface of the container's network, with the password of /run/secrets/redis-conf; only the
# stack's own network reaches it (docker-compose.yml publishes no port). Sessions survive a restart of Redis: the
# append-only file in /data (a volume) is synced every second, so a crash of Redis itself may lose the last second
# of saves (a replica's crash loses nothing: its saves are in Redis already). `--appendfsync always` closes that
# second at the price of one fsync per turn.
ENTRYPOINT ["redis-server", "/run/secrets/redis-conf", "--bind", "0.0.0.0", "--port", "6379", "--dir", "/data", \
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
