"""What authentication costs served generation: the same server with and without bearer tokens, side by side.

Two lstm-server processes on the same model repository (one without authentication, one with ``--auth-tokens``)
are started once; then, round after round, N sessions stream from each in turn (never both at once, in the order
ABBA, BAAB, ...), so that both see the same machine noise and neither always goes first. Reported: the median
aggregate characters per second of each, the median of the per-round ratios and its spread, and the server
process's own CPU time (user + system, from /proc) per 1000 characters: on a shared, noisy machine the CPU a
server spends per character moves far less with the neighbours' load than its wall-clock throughput does.
The target (issue "Isolation"): authentication costs less than 2% of throughput at 64 sessions.

    .venv/bin/python bench/auth_overhead.py [--models models] [--concurrency 64] [--rounds 8] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import warnings
from pathlib import Path

from serve_generation import cluster, served, start_server

from lstm_client import InsecureTokenWarning

TOKEN = "bench-token-0123456789abcdef"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    warnings.simplefilter("ignore", InsecureTokenWarning)  # loopback
    tokens = Path(tempfile.mkdtemp(prefix="bench-auth-")) / "tokens.txt"
    tokens.write_text(f"bench {TOKEN}\n")
    open_server = start_server(args.models, args.threads)
    auth_server = start_server(args.models, args.threads, extra=("--auth-tokens", str(tokens)))
    try:
        print(
            "| sessions | rounds | no auth chars/s (median) | bearer token chars/s (median) "
            "| token / no auth (median of rounds) | min / max of rounds "
            "| server CPU ms per 1000 chars, no auth / token | CPU token / no auth |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        pids = {"plain": open_server.pid, "token": auth_server.pid}
        runs = {
            "plain": lambda n: served(open_server.address, n, args.tokens),
            "token": lambda n: served(auth_server.address, n, args.tokens, token=TOKEN),
        }
        for n in args.concurrency:
            rates: dict[str, list[float]] = {"plain": [], "token": []}
            cpu: dict[str, list[float]] = {"plain": [], "token": []}
            for round_ in range(args.rounds):
                order = ["plain", "token"] if round_ % 2 == 0 else ["token", "plain"]
                for name in order:
                    before = cpu_seconds(pids[name])
                    rates[name].append(asyncio.run(runs[name](n))["chars_per_s"])
                    cpu[name].append((cpu_seconds(pids[name]) - before) / (n * args.tokens) * 1e6)
            ratios = [t / p for p, t in zip(rates["plain"], rates["token"], strict=True)]
            a, b = statistics.median(rates["plain"]), statistics.median(rates["token"])
            cpu_a, cpu_b = statistics.median(cpu["plain"]), statistics.median(cpu["token"])
            print(
                f"| {n} | {args.rounds} | {a:,.0f} | {b:,.0f} | {statistics.median(ratios):.3f} "
                f"| {min(ratios):.3f} / {max(ratios):.3f} | {cpu_a:.1f} / {cpu_b:.1f} | {cpu_b / cpu_a:.3f} |"
            )
    finally:
        cluster.stop(open_server)
        cluster.stop(auth_server)


if __name__ == "__main__":
    main()
