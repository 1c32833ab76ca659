"""HTTP against gRPC on one server: the same turns over lstm.v1, Triton's generate_stream and OpenAI streamed
completions, side by side on pinned cores.

One server (``lstm-server --threads 1 --http-port <free>``) runs under ``taskset -c <--server-cores>`` (default 0);
this process, the load generator, pins itself to ``--client-cores`` (default 1). For each concurrency N
(``--concurrency``, default 1 64), ``--rounds`` rounds (default 3), each round runs every arm once, in an order
rotated each round so that noise hits every arm alike:

- ``grpc``: N held sessions stream ``--tokens`` characters each, ``--turns`` turns (lstm.v1 Generate,
  bench/serve_generation.py's ``served``);
- ``generate``: the same over HTTP: N held sessions (opened over gRPC), each turn a ``generate_stream`` request
  naming its session (``x-session-id``), server-sent events read as they come;
- ``openai``: N clients, each turn a stateless streamed ``/v1/completions`` of the same prompt and length (a
  session opened, read, run and closed per request).

Reported per arm and N: median chars/s over the rounds, TTFT p50 and p99 (all rounds pooled), the server's CPU per
character (``/proc/<pid>/stat``) and each arm's chars/s relative to gRPC (the median of the rounds' ratios).
Every run is bounded by ``--timeout-s``; the server listens on 127.0.0.1.

    .venv/bin/python bench/serve_http.py                       # charlm's default entry, 1 and 64 sessions
    .venv/bin/python bench/serve_http.py --concurrency 1 --rounds 1 --tokens 50 --turns 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import serve_generation as sg

from lstm_client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("grpc", "generate", "openai")


async def sse_turn(http: aiohttp.ClientSession, url: str, body: dict, headers: dict, key: str) -> tuple[int, float]:
    """One streamed request: (characters received, seconds to the first one)."""
    started, first, count = time.perf_counter(), float("nan"), 0
    async with http.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            text = event[key] if key == "text_output" else event["choices"][0]["text"] if event["choices"] else ""
            if text and count == 0:
                first = time.perf_counter() - started
            count += len(text)
    return count, first


async def http_arm(args: argparse.Namespace, arm: str, grpc_address: str, http_base: str, n: int, pid: int) -> dict:
    """N streams of ``args.turns`` turns each over HTTP; the same figures as ``sg.served``."""
    ttft: list[float] = []
    async with AsyncClient(grpc_address, timeout=args.timeout_s) as client:
        sessions = []
        if arm == "generate":
            sessions = [await client.session(model="charlm", prompt=sg.PROMPT).open() for _ in range(n)]
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=args.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def one(i: int) -> int:
                total = 0
                for turn in range(args.turns):
                    seed = i + 1_000_003 * turn
                    if arm == "generate":
                        url, key = f"{http_base}/v2/models/charlm/generate_stream", "text_output"
                        body = {"text_input": "", "max_tokens": args.tokens, "temperature": sg.TEMPERATURE}
                        headers = {"x-session-id": sessions[i].id}
                    else:
                        url, key, headers = f"{http_base}/v1/completions", "choices", {}
                        body = {"model": "charlm", "prompt": sg.PROMPT, "max_tokens": args.tokens, "stream": True}
                        body["temperature"] = sg.TEMPERATURE
                    body["seed"] = seed
                    count, first = await sse_turn(http, url, body, headers, key)
                    ttft.append(first)
                    total += count
                return total

            cpu = sg.process_cpu_s(pid)
            started = time.perf_counter()
            counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), args.timeout_s)
            elapsed = time.perf_counter() - started
            cpu = sg.process_cpu_s(pid) - cpu
        for session in sessions:
            await session.close()
    return {"chars": sum(counts), "seconds": elapsed, "ttft": ttft, "server_cpu_s": cpu}


async def run_arm(args: argparse.Namespace, arm: str, server, http_base: str, n: int) -> dict:
    if arm == "grpc":
        return await sg.served(server.address, n, args.tokens, "", server.pid, args.timeout_s, args.turns)
    return await http_arm(args, arm, server.address, http_base, n, server.pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--client-cores", default="1")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {int(c) for c in args.client_cores.split(",")})
    http_port = sg.cluster.free_port()
    prefix = ("taskset", "-c", args.server_cores)
    server = sg.start_server(args.models, 1, "", ("--http-port", str(http_port)), prefix)
    http_base = f"http://127.0.0.1:{http_port}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    print(f"commit {commit.strip()}, {platform.node()}, {os.cpu_count()} cores, server on cores {args.server_cores}, "
          f"client on {args.client_cores}, {args.tokens} chars x {args.turns} turns, {args.rounds} rounds")  # fmt: skip
    try:
        warm = argparse.Namespace(**{**vars(args), "tokens": 20, "turns": 1})
        for arm in ARMS:  # first requests pay for connections and lazy imports: not measured
            asyncio.run(run_arm(warm, arm, server, http_base, 1))
        for n in args.concurrency:
            runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
            for r in range(args.rounds):
                order = ARMS[r % 3 :] + ARMS[: r % 3]
                for arm in order:
                    runs[arm].append(asyncio.run(run_arm(args, arm, server, http_base, n)))
            print(f"\n{n} session(s)")
            print("| arm | chars/s (median) | vs grpc | TTFT p50 ms | TTFT p99 ms | server CPU µs/char |")
            print("|---|---|---|---|---|---|")
            grpc_rates = [run["chars"] / run["seconds"] for run in runs["grpc"]]
            for arm in ARMS:
                rates = [run["chars"] / run["seconds"] for run in runs[arm]]
                ratio = statistics.median(a / b for a, b in zip(rates, grpc_rates, strict=True))
                ttft = [t for run in runs[arm] for t in run["ttft"]]
                cpu = sum(run["server_cpu_s"] for run in runs[arm]) / sum(run["chars"] for run in runs[arm])
                print(f"| {arm} | {statistics.median(rates):,.0f} | {ratio:.2f} | {1e3 * np.percentile(ttft, 50):.1f} "
                      f"| {1e3 * np.percentile(ttft, 99):.1f} | {1e6 * cpu:.1f} |")  # fmt: skip
            sys.stdout.flush()
    finally:
        sg.cluster.stop(server)


if __name__ == "__main__":
    main()
