"""Deployment benchmarks: idle sessions one server process holds, and generation through the gateway.

1. Idle sessions: one lstm-server process (started here) gets ``--sessions``
   sessions, each having read a short prompt; its resident memory (VmRSS) is
   read as they accumulate. Memory per session is the slope. With
   ``--store redis`` the replica keeps at most ``--cache`` sessions in memory
   (the rest leave for Redis) and Redis's own memory is reported too.
2. Throughput: N sessions streaming ``--tokens`` characters each, directly to
   a replica and through the nginx gateway, side by side in alternating
   rounds on the loopback cluster (deploy/cluster.py): with one replica (the
   gateway's cost) and with two (what a second replica adds on this machine).

    .venv/bin/python bench/deploy_sessions.py idle [--sessions 100000] [--store memory|redis]
    .venv/bin/python bench/deploy_sessions.py throughput [--concurrency 16 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_generation import PROMPT, cluster, served

from lstm_client import AsyncClient, TlsConfig

REPO = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def redis_used_mib(redis: cluster.Process) -> float:
    host, port = redis.address.split(":")
    info = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "info", "memory"], capture_output=True, text=True, check=True
    ).stdout
    used = next(line for line in info.splitlines() if line.startswith("used_memory:"))
    return int(used.split(":")[1]) / 2**20


async def create_sessions(address: str, count: int, concurrency: int = 64) -> None:
    async with AsyncClient(address, timeout=120) as client:
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                await client.session(model="charlm", prompt=PROMPT).open()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def idle(args: argparse.Namespace) -> None:
    binaries = cluster.ensure_packages()
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    redis = (
        cluster.start_redis(workdir, cluster.free_port(), binaries["redis-server"]) if args.store == "redis" else None
    )
    settings = {"max_sessions": args.cache if redis else args.sessions + 100, "idle_timeout_s": 86400}
    env = {f"LSTM_SERVER_{k.upper()}": str(v) for k, v in settings.items()}
    env |= {"LSTM_SERVER_LOG_LEVEL": "WARNING", "LSTM_SERVER_METRICS_PORT": "0", "LSTM_SERVER_MODELS": str(args.models)}
    if redis:  # a bench-only key: replicas sharing a store must share the keys that sign states
        env |= {"LSTM_SERVER_SESSION_STORE": "redis", "LSTM_SERVER_REDIS_URL": f"redis://{redis.address}/0"}
        env |= {"LSTM_SERVER_STATE_KEYS": "bench:" + secrets.token_hex(16)}
    port = cluster.free_port()
    server = cluster.spawn("server", [sys.executable, "-m", "lstm_server.cli", "--port", str(port)], port, workdir, env)
    try:
        cluster.wait_until_serving(server)
        step = args.sessions // args.samples
        print(f"store {args.store}; models {args.models}; {platform.machine()}, {os.cpu_count()} cores\n")
        print("| sessions | server RSS MiB | Redis used MiB | seconds |")
        print("|---:|---:|---:|---:|")
        started = time.perf_counter()
        baseline = rss_mib(server.pid)
        for held in range(0, args.sessions + 1, step):
            if held:
                asyncio.run(create_sessions(server.address, step))
            used = f"{redis_used_mib(redis):,.0f}" if redis else "-"
            print(f"| {held:,} | {rss_mib(server.pid):,.0f} | {used} | {time.perf_counter() - started:.0f} |")
        per_session = (rss_mib(server.pid) - baseline) * 2**20 / args.sessions
        print(f"\nserver memory per session: {per_session / 1024:.1f} KiB")
        if redis:
            print(f"Redis memory per session: {redis_used_mib(redis) * 2**20 / args.sessions / 1024:.1f} KiB")
    finally:
        cluster.stop(server)
        if redis:
            cluster.stop(redis)


def throughput(args: argparse.Namespace) -> None:
    print(
        f"models {args.models}; {platform.machine()}, {os.cpu_count()} cores; {args.tokens} chars per session; "
        f"{args.threads or os.cpu_count()} onnxruntime threads per replica\n"
    )
    print(
        "| replicas | sessions | direct chars/s | gateway chars/s | gateway / direct | TTFT p50 direct / gateway ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for replicas in args.replicas:
        workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
        threads = args.threads or os.cpu_count()
        running = cluster.up(workdir, args.models, replicas=replicas, log_level="WARNING", threads=threads)
        token = running.token
        through_gateway = {"token": token, "tls": TlsConfig(ca=running.ca)}
        try:
            for n in args.concurrency:
                direct, gateway = [], []
                for _ in range(args.rounds):  # alternating, so drift in the machine's load hits both alike
                    direct.append(asyncio.run(served(running.replicas[0].address, n, args.tokens, token=token)))
                    gateway.append(asyncio.run(served(running.gateway.address, n, args.tokens, **through_gateway)))
                d = statistics.median(r["chars_per_s"] for r in direct)
                g = statistics.median(r["chars_per_s"] for r in gateway)
                ttft_d = statistics.median(r["ttft_p50"] for r in direct)
                ttft_g = statistics.median(r["ttft_p50"] for r in gateway)
                ttft = f"{1e3 * ttft_d:.1f} / {1e3 * ttft_g:.1f}"
                print(f"| {replicas} | {n} | {d:,.0f} | {g:,.0f} | {g / d:.2f} | {ttft} |")
        finally:
            running.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["idle", "throughput"])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=4, help="RSS readings while the sessions accumulate")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--cache", type=int, default=10_000, help="with redis: sessions kept in the replica")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="cluster sizes to measure")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per replica (0: the cores)")
    args = parser.parse_args()
    args.models = args.models.resolve()
    idle(args) if args.what == "idle" else throughput(args)


if __name__ == "__main__":
    main()
