"""What authentication costs served generation: the same server with and without bearer tokens, side by side.

Two lstm-server processes on the same model repository (one without authentication, one with ``--auth-tokens``)
are started once; then, round after round, N sessions stream from each in turn (never both at once), so that
both see the same machine noise. Reported: the median aggregate characters per second of each, and their ratio.
The target (issue "Isolation"): authentication costs less than 2% of throughput at 64 sessions.

    .venv/bin/python bench/auth_overhead.py [--models models] [--concurrency 64] [--rounds 5] [--tokens 200]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    warnings.simplefilter("ignore", InsecureTokenWarning)  # loopback
    tokens = Path(tempfile.mkdtemp(prefix="bench-auth-")) / "tokens.txt"
    tokens.write_text(f"bench {TOKEN}\n")
    open_server = start_server(args.models, args.threads)
    auth_server = start_server(args.models, args.threads, extra=("--auth-tokens", str(tokens)))
    try:
        print("| sessions | rounds | no auth chars/s (median) | bearer token chars/s (median) | token / no auth |")
        print("|---:|---:|---:|---:|---:|")
        for n in args.concurrency:
            plain, secured = [], []
            for _ in range(args.rounds):
                plain.append(asyncio.run(served(open_server.address, n, args.tokens))["chars_per_s"])
                secured.append(asyncio.run(served(auth_server.address, n, args.tokens, token=TOKEN))["chars_per_s"])
            a, b = statistics.median(plain), statistics.median(secured)
            print(f"| {n} | {args.rounds} | {a:,.0f} | {b:,.0f} | {b / a:.3f} |")
            print(f"  per round, no auth: {[round(x) for x in plain]}; token: {[round(x) for x in secured]}")
    finally:
        cluster.stop(open_server)
        cluster.stop(auth_server)


if __name__ == "__main__":
    main()
