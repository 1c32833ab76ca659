"""A million sessions through one replica, the rest of them in Redis (issue 25).

One ``lstm-server`` process (started here, Redis session store, at most ``--cache``
sessions in memory: the least recently used idle ones leave for Redis) and one
redis-server (started here on loopback, in a temporary folder, no persistence,
``--maxmemory`` so it can never take the machine). Then:

1. open ``--sessions`` charlm sessions, each reading its own prompt
   (``ROMEO <letters>:\\n``), ``--concurrency`` at a time; a row every
   ``--sessions / --samples``: the replica's RSS, Redis's ``used_memory``, the open
   rate and open latencies of the interval;
2. resume ``--resume`` random sessions that were evicted long ago: GetSession
   (the replica loads it from Redis) then a Generate of ``--tokens`` characters
   (continued, saved back): rates, latencies, Redis's network bytes per saved turn;
3. exactness: ``--verify`` of the evicted sessions continue exactly as a fresh
   session that read the same prompt (same seed, same text), or the run fails.

    .venv/bin/python bench/million_sessions.py --sessions 1000000 --time-limit-s 4800

Stops opening sessions at ``--time-limit-s`` (and says so), then runs 2 and 3 on
what it opened. Redis and the replica are stopped and the folder removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lstm_client import AsyncClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
import cluster  # noqa: E402

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def prompt_of(index: int) -> str:
    """A prompt of its own for session ``index`` (capital letters only: all in charlm's vocabulary)."""
    name = ""
    while True:
        index, digit = divmod(index, 26)
        name += LETTERS[digit]
        if not index:
            return f"ROMEO {name}:\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def redis_info(address: str, *args: str) -> dict[str, str]:
    host, port = address.split(":")
    text = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def redis_command(address: str, *args: str) -> str:
    host, port = address.split(":")
    return subprocess.run(
        ["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def quantiles_ms(seconds: list[float]) -> str:
    if len(seconds) < 2:
        return "-"
    cuts = statistics.quantiles(seconds, n=100)
    return f"{1e3 * statistics.median(seconds):.1f} / {1e3 * cuts[98]:.1f}"


async def open_sessions(
    client: AsyncClient, first: int, count: int, concurrency: int, ids: list[str], deadline: float
) -> list[float]:
    """Open sessions ``first .. first + count - 1`` (their ids appended to ``ids`` by index); their latencies."""
    latencies: list[float] = []
    indices = iter(range(first, first + count))

    async def worker() -> None:
        for index in indices:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            session = await client.session(model="charlm", prompt=prompt_of(index)).open()
            latencies.append(time.perf_counter() - started)
            ids[index] = session.id

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def resume(client: AsyncClient, picks: list[int], ids: list[str], tokens: int, concurrency: int) -> dict:
    """GetSession then Generate on each picked session; the latencies of each and the wall time."""
    loads: list[float] = []
    turns: list[float] = []
    chars = 0
    queue = iter(picks)

    async def worker() -> None:
        nonlocal chars
        for index in queue:
            started = time.perf_counter()
            session = await client.attach(ids[index])
            loaded = time.perf_counter()
            async for chunk in session.generate(max_tokens=tokens, seed=index):
                chars += len(chunk.text)
            loads.append(loaded - started)
            turns.append(time.perf_counter() - loaded)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"loads": loads, "turns": turns, "chars": chars, "seconds": time.perf_counter() - started}


async def text_of(session, tokens: int, seed: int) -> str:
    return "".join([chunk.text async for chunk in session.generate(max_tokens=tokens, seed=seed)])


async def verify(client: AsyncClient, picks: list[int], ids: list[str], tokens: int) -> int:
    """Each picked (evicted) session continues exactly as a fresh one that read the same prompt; the mismatches."""
    mismatches = 0
    for index in picks:
        stored = await text_of(await client.attach(ids[index]), tokens, seed=index)
        fresh = await client.session(model="charlm", prompt=prompt_of(index)).open()
        if await text_of(fresh, tokens, seed=index) != stored:
            mismatches += 1
            print(f"MISMATCH: session {index} ({ids[index]}) continued differently from a fresh one", flush=True)
        await fresh.close()
    return mismatches


def run(args: argparse.Namespace) -> int:
    binaries = cluster.ensure_packages()
    workdir = Path(tempfile.mkdtemp(prefix="bench-million-"))
    redis_args = ["--appendonly", "no", "--maxmemory", args.redis_maxmemory, "--maxmemory-policy", "noeviction"]
    redis = cluster.start_redis(workdir, cluster.free_port(), binaries["redis-server"], extra_args=redis_args)
    env = {
        "LSTM_SERVER_MODELS": str(args.models),
        "LSTM_SERVER_LOG_LEVEL": "WARNING",
        "LSTM_SERVER_METRICS_PORT": "0",
        "LSTM_SERVER_MAX_SESSIONS": str(args.cache),
        "LSTM_SERVER_IDLE_TIMEOUT_S": "86400",  # no session may expire during the run
        "LSTM_SERVER_SESSION_STORE": "redis",
        "LSTM_SERVER_REDIS_URL": f"redis://{redis.address}/0",
        "LSTM_SERVER_STATE_KEYS": "bench:" + secrets.token_hex(16),  # replicas sharing a store share their keys
        "LSTM_SERVER_THREADS": str(args.threads),
    }
    port = cluster.free_port()
    server = cluster.spawn("server", [sys.executable, "-m", "lstm_server.cli", "--port", str(port)], port, workdir, env)
    try:
        cluster.wait_until_serving(server)
        print(f"redis pid {redis.pid}, replica pid {server.pid}, in {workdir}", file=sys.stderr, flush=True)
        return asyncio.run(measure(args, server, redis))
    finally:
        cluster.stop(server)
        cluster.stop(redis)
        shutil.rmtree(workdir, ignore_errors=True)


async def measure(args: argparse.Namespace, server: cluster.Process, redis: cluster.Process) -> int:
    print(
        f"commit {args.commit}; {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"models {args.models}; cache {args.cache:,} sessions; concurrency {args.concurrency}; "
        f"Redis maxmemory {args.redis_maxmemory}\n",
        flush=True,
    )
    deadline = time.monotonic() + args.time_limit_s
    ids: list[str] = [""] * args.sessions
    step = max(1, args.sessions // args.samples)
    print("| sessions | replica RSS MiB | Redis used MiB | Redis bytes/session | opens/s | open p50 / p99 ms | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    base_used = int(redis_info(redis.address, "info", "memory")["used_memory"])
    started = time.perf_counter()
    opened = 0
    async with AsyncClient(server.address, timeout=120) as client:
        while opened < args.sessions and time.monotonic() < deadline:
            count = min(step, args.sessions - opened)
            interval = time.perf_counter()
            latencies = await open_sessions(client, opened, count, args.concurrency, ids, deadline)
            opened += len(latencies)
            rate = len(latencies) / (time.perf_counter() - interval)
            used = int(redis_info(redis.address, "info", "memory")["used_memory"])
            print(
                f"| {opened:,} | {rss_mib(server.pid):,.0f} | {used / 2**20:,.0f} | "
                f"{(used - base_used) / opened:,.0f} | {rate:,.0f} | {quantiles_ms(latencies)} | "
                f"{time.perf_counter() - started:,.0f} |",
                flush=True,
            )
        if opened < args.sessions:
            print(f"\nSTOPPED at {opened:,} sessions: --time-limit-s {args.time_limit_s} reached", flush=True)
        held = [index for index, session_id in enumerate(ids) if session_id]

        sample = ids[held[0]]
        state_bytes = int(redis_command(redis.address, "hstrlen", f"lstm:session:{sample}", "state"))
        key_bytes = int(redis_command(redis.address, "memory", "usage", f"lstm:session:{sample}"))
        keys = int(redis_command(redis.address, "dbsize"))
        usage = f"state field {state_bytes:,} bytes, MEMORY USAGE {key_bytes:,}"
        print(f"\nRedis keys {keys:,}; one session's hash: {usage}")

        # Sessions the replica evicted long ago: all but the last `cache` opened (the table holds at most that many).
        evicted = held[: max(1, len(held) - args.cache)]
        rng = random.Random(25)
        picks = rng.sample(evicted, min(args.resume, len(evicted)))
        net_before = int(redis_info(redis.address, "info", "stats")["total_net_input_bytes"])
        resumed = await resume(client, picks, ids, args.tokens, args.concurrency)
        net_after = int(redis_info(redis.address, "info", "stats")["total_net_input_bytes"])
        print(
            f"\nresumed {len(picks):,} evicted sessions, {args.concurrency} at a time: "
            f"{len(picks) / resumed['seconds']:,.0f} resumes/s (GetSession + a {args.tokens}-character Generate), "
            f"{resumed['chars'] / resumed['seconds']:,.0f} chars/s; GetSession (load from Redis) p50 / p99 "
            f"{quantiles_ms(resumed['loads'])} ms; Generate p50 / p99 {quantiles_ms(resumed['turns'])} ms; "
            f"Redis received {(net_after - net_before) / len(picks):,.0f} bytes per resumed turn (its save)",
            flush=True,
        )
        print(f"replica RSS after resuming: {rss_mib(server.pid):,.0f} MiB", flush=True)

        picked = set(picks)
        checks = rng.sample([i for i in evicted if i not in picked], min(args.verify, len(evicted) - len(picks)))
        mismatches = await verify(client, checks, ids, args.tokens)
        exact = len(checks) - mismatches
        print(f"\nexactness: {exact} of {len(checks)} evicted sessions continued exactly as fresh ones")
        used = int(redis_info(redis.address, "info", "memory")["used_memory"])
        print(
            f"final: Redis used {used / 2**20:,.0f} MiB, replica RSS {rss_mib(server.pid):,.0f} MiB, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return 1 if mismatches else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=10, help="rows while the sessions accumulate")
    parser.add_argument("--cache", type=int, default=10_000, help="sessions the replica holds in memory")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--resume", type=int, default=10_000, help="random evicted sessions to load and continue")
    parser.add_argument("--verify", type=int, default=200, help="evicted sessions checked against fresh ones")
    parser.add_argument("--tokens", type=int, default=32, help="characters generated per resumed turn")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: the cores)")
    parser.add_argument("--redis-maxmemory", default="15gb")
    parser.add_argument("--time-limit-s", type=float, default=4800, help="stop opening sessions after this long")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a bounding `timeout` still stops Redis and the replica
    args.models = args.models.resolve()
    args.commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
