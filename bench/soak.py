"""Soak: one server held busy for a long time, sampled every minute, to see whether anything grows or degrades.

One ``lstm-server`` (bench/serve_generation.py's ``start_server``: default models and options, loopback only) and
``--sessions`` streaming sessions (default 256) kept busy for ``--minutes`` (default 60) with a bounded mix: turns
of 50-400 characters at temperature 0.8; about 5% of turns cancelled mid-stream by the client (the stream closed
early: expected, counted apart); before about 2% of turns the session is closed and a new one created. Every
``--interval-s`` (default 60) one line, flushed and written to ``--csv``: the server's RSS (``VmRSS``), open file
descriptors and threads, characters per second, TTFT p50/p99 and inter-token p99 as a reader sees it (a message's
first character: the gap since the previous message; the others in it: 0) over that interval, and the errors by
gRPC status code. At the end a summary (first vs last 10 intervals: RSS, FDs, TTFT p99, ITL p99; errors by code);
the exit status is 1 if any error appeared (the server's or a client-side timeout) or the server died.

Bounds: each turn ``--turn-timeout-s``, session create/close 30 s, at most 10**7 turns per session; a turn that
fails is counted and the session goes on (or is replaced when the session itself is gone).

    .venv/bin/python bench/soak.py --csv /tmp/soak.csv                           # one hour, 256 sessions
    .venv/bin/python bench/soak.py --minutes 0.2 --interval-s 3 --sessions 4      # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import serve_generation as sg

from lstm_client import AsyncClient
from lstm_client.errors import LstmError

CANCEL_P, CHURN_P, MIN_CHARS, MAX_CHARS = 0.05, 0.02, 50, 400
FIELDS = ["minute", "elapsed_s", "rss_mib", "fds", "threads", "chars_per_s", "turns", "client_cancels",
          "busy_after_cancel", "replaced", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "server_cores",
          "errors"]  # fmt: skip


@dataclass
class Window:
    """What the sessions saw since the last sample."""

    chars: int = 0
    turns: int = 0
    cancels: int = 0
    busy: int = 0
    replaced: int = 0
    ttft: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def proc_status(pid: int) -> tuple[float, int, int]:
    """RSS in MiB, open file descriptors and threads of ``pid``; nan / -1 if unreadable."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:")) / 1024  # fmt: skip
        return rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, StopIteration):
        return float("nan"), -1, -1


def error_code(error: BaseException) -> str:
    if isinstance(error, LstmError):
        return error.code.name
    return "CLIENT_TIMEOUT" if isinstance(error, TimeoutError) else type(error).__name__


class Soak:
    def __init__(self, args: argparse.Namespace, address: str) -> None:
        self.args, self.address = args, address
        self.window, self.totals = Window(), Counter[str]()
        self.stop = asyncio.Event()

    def fail(self, error: BaseException) -> None:
        code = error_code(error)
        self.window.errors[code] += 1
        self.totals[code] += 1

    async def turn(self, session, rng: random.Random) -> bool:
        """One turn; True if the client closed the stream early."""
        tokens = rng.randint(MIN_CHARS, MAX_CHARS)
        cut = rng.randint(1, tokens - 1) if rng.random() < CANCEL_P else tokens + 1
        started = last = time.perf_counter()
        count = 0
        async with asyncio.timeout(self.args.turn_timeout_s):
            stream = session.generate("", max_tokens=tokens, temperature=0.8, seed=rng.getrandbits(31))
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    now = time.perf_counter()
                    if not chunk.text:
                        continue
                    window = self.window
                    if count == 0:
                        window.ttft.append(now - started)
                    else:
                        window.seen.append(now - last)
                    window.seen.extend([0.0] * (len(chunk.text) - 1))
                    window.chars += len(chunk.text)
                    count += len(chunk.text)
                    last = now
                    if count >= cut:  # close the stream early: the client's own cancellation
                        window.cancels += 1
                        break
        self.window.turns += 1
        return count >= cut

    async def retire(self, session, error: BaseException) -> None:
        """Count ``error``; close the session (it may be gone or still busy: a new one next), pause briefly."""
        self.fail(error)
        if session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await session.close()
        with contextlib.suppress(asyncio.TimeoutError):  # a short pause, or the end
            await asyncio.wait_for(self.stop.wait(), 0.5)

    async def worker(self, client: AsyncClient, index: int) -> None:
        rng = random.Random(self.args.seed * 100_003 + index)
        # cancelled: the last turn was closed early by us; busy_retries: SESSION_BUSY answers in a row since
        session, busy_retries, cancelled = None, 0, False
        for _ in range(10**7):
            if self.stop.is_set():
                break
            try:
                if session is not None and rng.random() < CHURN_P:
                    self.window.replaced += 1
                    old, session = session, None
                    async with asyncio.timeout(30):
                        await old.close()
                if session is None:
                    async with asyncio.timeout(30):
                        session = await client.session(model="charlm", prompt=sg.PROMPT).open()
                    cancelled = False
                cancelled = await self.turn(session, rng)
                busy_retries = 0
            except LstmError as error:
                if error.reason == "SESSION_BUSY" and cancelled and busy_retries < 20:
                    # the server has not yet seen the cancelled stream end: expected, retry after its delay
                    self.window.busy += 1
                    busy_retries += 1
                    await asyncio.sleep(min(error.retry_delay or 0.05, 1.0))
                    continue
                await self.retire(session, error)
                session, cancelled = None, False
            except Exception as error:
                await self.retire(session, error)
                session, cancelled = None, False
        if session is not None:
            try:
                async with asyncio.timeout(30):
                    await session.close()
            except Exception as error:
                self.fail(error)

    async def sample(self, pid: int, write: Callable[[dict], None], rows: list[dict]) -> None:
        total_s = self.args.minutes * 60
        start = last = time.perf_counter()
        cpu = sg.process_cpu_s(pid)
        for k in range(1, int(total_s // self.args.interval_s) + 2):
            await asyncio.sleep(max(0.0, start + min(k * self.args.interval_s, total_s) - time.perf_counter()))
            now, window, self.window = time.perf_counter(), self.window, Window()
            cpu, cpu_before = sg.process_cpu_s(pid), cpu
            rss, fds, threads = proc_status(pid)
            row = {
                "minute": round((now - start) / 60, 2), "elapsed_s": round(now - start, 1), "rss_mib": round(rss, 1),
                "fds": fds, "threads": threads, "chars_per_s": round(window.chars / (now - last)),
                "turns": window.turns, "client_cancels": window.cancels, "busy_after_cancel": window.busy,
                "replaced": window.replaced,
                "ttft_p50_ms": round(1e3 * sg.percentile(window.ttft, 50), 1),
                "ttft_p99_ms": round(1e3 * sg.percentile(window.ttft, 99), 1),
                "itl_p99_ms": round(1e3 * sg.percentile(window.seen, 99), 1),
                "server_cores": round((cpu - cpu_before) / (now - last), 2),
                "errors": " ".join(f"{code}={n}" for code, n in sorted(window.errors.items())) or "none",
            }  # fmt: skip
            last = now
            rows.append(row)
            write(row)
            print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
            if now - start >= total_s - 1e-6 or not sg.cluster.alive(pid):
                break
        self.stop.set()

    async def run(self, pid: int, write: Callable[[dict], None], rows: list[dict]) -> None:
        async with AsyncClient(self.address, timeout=30) as client:
            workers = [asyncio.create_task(self.worker(client, i)) for i in range(self.args.sessions)]
            await self.sample(pid, write, rows)
            _, pending = await asyncio.wait(workers, timeout=self.args.turn_timeout_s + 60)
            for task in pending:  # bounded: whatever is still stuck is dropped
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def summary(rows: list[dict], totals: Counter[str], alive: bool) -> int:
    k = min(10, max(1, len(rows) // 2))

    def mean(part: list[dict], key: str) -> str:
        values = [float(r[key]) for r in part if float(r[key]) == float(r[key])]
        return f"{sum(values) / len(values):.1f}" if values else "nan"

    print(f"\nsummary over {len(rows)} intervals: first {k} vs last {k} (means)")
    for key in ("rss_mib", "fds", "threads", "chars_per_s", "ttft_p99_ms", "itl_p99_ms"):
        print(f"  {key}: {mean(rows[:k], key)} -> {mean(rows[-k:], key)}")
    print(f"  errors by code: {dict(totals) or 'none'}; server {'alive' if alive else 'DIED'} at the end", flush=True)
    return 0 if not totals and alive else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--turn-timeout-s", type=float, default=120.0, help="bound of one turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, help="write the samples here")
    args = parser.parse_args()
    server = sg.start_server(args.models, 0)  # --threads 0: the server's default, one per core
    print(f"server pid {server.pid} at {server.address} (log {server.log}); {args.sessions} sessions, "
          f"{args.minutes} min, sample every {args.interval_s} s", flush=True)  # fmt: skip
    soak, rows = Soak(args, server.address), []
    try:
        with open(args.csv or os.devnull, "w", newline="") as handle:
            out = csv.DictWriter(handle, FIELDS)
            out.writeheader()

            def write(row: dict) -> None:
                out.writerow(row)
                handle.flush()

            asyncio.run(soak.run(server.pid, write, rows))
        alive = sg.cluster.is_running(server)
    finally:
        sg.cluster.stop(server)
    sys.exit(summary(rows, soak.totals, alive))


if __name__ == "__main__":
    main()
