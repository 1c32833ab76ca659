"""The headline "served vs runtime" figure, on pinned cores: the server, the load generator and the in-process
baseline each get their own CPUs, so neither side borrows the other's.

The server (``lstm-server --threads <its core count>``) runs under ``taskset -c <--server-cores>`` (default 0);
this process, the gRPC load generator, pins all its threads to ``--client-cores`` (default 1); the in-process
baseline runs in a child process pinned to the server's cores. For each charlm version (``--versions``, default
1 2) and concurrency N (``--concurrency``, default 1 64), ``--rounds`` rounds (default 3), each round:

- served: N sessions stream ``--tokens`` characters each, ``--turns`` turns (bench/serve_generation.py's
  ``served``): aggregate chars/s, TTFT, inter-token gaps as a reader sees them, the server's CPU by thread;
- in-process: onnxruntime's single-step loop on the entry's step graph (``model.onnx``) at batch N, the state
  carried, the next token the argmax, ``intra_op_num_threads`` = the server's core count (``in_process`` there),
  ``--in-process-steps`` steps (default: tokens x turns, a served row's length).

Reported per version and N: median served and in-process chars/s, served / in-process (the median of the rounds'
ratios), TTFT p50 and inter-token p99 as seen (all rounds' samples pooled), the server's CPU per character and in
cores, split event loop / model threads / other threads (onnxruntime's workers, gRPC's poller).

A/B: besides server A (this checkout's, or ``--server-src DIR``'s alone), ``--ab DIR`` adds a server B from
another checkout (``git worktree add /tmp/base <commit>``), run by this venv's Python (or ``--server-python``)
with ``PYTHONPATH=DIR/server/src:DIR/client/src``; within every round both servers serve in turn (order flipped
each round; the idle one's CPU is reported), then the in-process run; both ratios and B/A are printed. Bounds:
``--served-timeout-s`` per served run, ``--time-limit-s`` per in-process run, ``--budget-s`` for the whole run
(no new round after it). Servers listen on 127.0.0.1.

    .venv/bin/python bench/serve_pinned.py                                      # charlm 1 and 2, 1 and 64 sessions
    .venv/bin/python bench/serve_pinned.py --ab /tmp/base --versions 2         # working tree (A) vs /tmp/base (B)
    .venv/bin/python bench/serve_pinned.py --quick --versions 2 --concurrency 1     # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import serve_generation as sg

from lstm_server.runtime.model_repository import load_entry

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("event loop", "model threads", "other threads")
_sessions: dict[str, ort.InferenceSession] = {}  # the in-process worker's, by model path


@dataclass
class Side:
    """One server under test: its label, the checkout it runs from and the Python that runs it."""

    label: str
    src: Path
    python: str
    server: sg.cluster.Process | None = None


def parse_cores(text: str) -> set[int]:
    """``0``, ``0,2``, ``0-3`` as taskset reads them."""
    cores: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


def pin_process(cores: set[int]) -> None:
    """Every thread of this process on ``cores``; the threads started later inherit it."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), cores)


def cpus_of(pid: int) -> list[int]:
    """The CPUs any thread of process ``pid`` may run on."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            cpus |= os.sched_getaffinity(int(task.name))
    return sorted(cpus)


def in_process_rate(
    model: str, layers: int, hidden: int, batch: int, steps: int, threads: int, limit_s: float
) -> tuple[float, list[int]]:
    """In the worker: serve_generation's single-step loop on ``model`` (its session made once); the chars/s and
    the CPUs the worker's threads may use."""
    if model not in _sessions:
        _sessions[model] = sg.onnx_session(Path(model), threads)
    return sg.in_process(_sessions[model], layers, hidden, batch, steps, limit_s), cpus_of(os.getpid())


def server_env(src: Path) -> dict[str, str]:
    paths = [str(src / "server" / "src"), str(src / "client" / "src"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run_text(command: list[str], env: dict[str, str] | None = None) -> str:
    """The last line a short command prints (stdout, else stderr)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if lines else "?"


def describe(side: Side) -> str:
    commit = run_text(["git", "-C", str(side.src), "describe", "--always", "--dirty"])
    imported = run_text([side.python, "-c", "import lstm_server; print(lstm_server.__file__)"], server_env(side.src))
    return f"server {side.label}: {side.src} at {commit}, lstm_server from {imported}"


HEADER = (
    "| sessions | server | served chars/s | in-process chars/s | served / in-process | TTFT p50 ms "
    "| ITL p99 ms (as seen) | server CPU us/char | us/char: loop / model / other | cores: loop / model / other "
    "| idle other server CPU ms |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(label: str, n: int, runs: list[dict], base: list[float], idle_ms: str) -> tuple[str, list[float]]:
    """The table row of one server's rounds against the same rounds' in-process rates; and its ratios."""
    rates = [r["chars"] / r["seconds"] for r in runs]
    ratios = [rate / b for rate, b in zip(rates, base, strict=False)]
    chars, seconds = sum(r["chars"] for r in runs), sum(r["seconds"] for r in runs)
    cpu = {role: sum(r["server_threads_cpu_s"].get(role, 0.0) for r in runs) for role in ROLES}
    ttft = [t for r in runs for t in r["ttft"]]
    seen = [g for r in runs for g in r["seen"]]
    text = (
        f"| {n} | {label} | {sg.median(rates):,.0f} | {sg.median(base):,.0f} | {sg.median(ratios):.3f} "
        f"| {1e3 * sg.percentile(ttft, 50):.1f} | {1e3 * sg.percentile(seen, 99):.2f} "
        f"| {sg.per_char_us(sum(r['server_cpu_s'] for r in runs), chars)} "
        f"| {' / '.join(sg.per_char_us(cpu[role], chars) for role in ROLES)} "
        f"| {' / '.join(f'{cpu[role] / seconds:.2f}' for role in ROLES)} | {idle_ms} |"
    )
    return text, ratios


def served_round(args: argparse.Namespace, n: int, order: list[Side], runs: dict, idle: dict) -> None:
    """Each server of ``order`` serves ``n`` sessions in turn; the others' CPU meanwhile counts as idle."""
    for side in order:
        others = [s for s in order if s is not side]
        before = [sg.process_cpu_s(s.server.pid) for s in others]
        run = sg.served(side.server.address, n, args.tokens, "", side.server.pid, args.served_timeout_s, args.turns)
        runs[side.label].append(asyncio.run(run))
        for other, cpu in zip(others, before, strict=True):
            idle[other.label] += 1e3 * (sg.process_cpu_s(other.server.pid) - cpu)


def bench_version(args: argparse.Namespace, version: int, sides: list[Side], pool: ProcessPoolExecutor) -> list[str]:
    """Start the servers for ``version``, print its table; the summary lines (the ratios) come back."""
    entry = load_entry(args.models / "charlm" / str(version))
    kind = "int8" if "quantization" in entry.manifest else "fp32"
    threads, summary, taskset = len(parse_cores(args.server_cores)), [], ("taskset", "-c", args.server_cores)
    shape = (str(entry.file("model.onnx")), entry.num_layers, entry.hidden_size)
    print(f"\n## charlm/{version} ({kind}): {entry.path}\n\n{HEADER}", flush=True)
    try:
        for side in sides:
            extra, env = tuple(args.server_arg), server_env(side.src)
            side.server = sg.start_server(args.models, threads, f"charlm={version}", extra, taskset, side.python, env)
        pinning = ", ".join(f"server {s.label} {cpus_of(s.server.pid)}" for s in sides)
        for n in args.concurrency:
            runs: dict[str, list[dict]] = {side.label: [] for side in sides}
            idle = {side.label: 0.0 for side in sides}
            base: list[float] = []
            for round_ in range(args.rounds):
                if round_ and time.monotonic() > args.deadline:
                    print(f"(budget spent: {round_} round(s) at {n} sessions)")
                    break
                served_round(args, n, sides if round_ % 2 == 0 else sides[::-1], runs, idle)
                job = pool.submit(in_process_rate, *shape, n, args.in_process_steps, threads, args.time_limit_s)
                rate, worker_cpus = job.result(timeout=args.time_limit_s + 180)
                base.append(rate)
            ratios = {}
            for side in sides:
                idle_ms = f"{idle[side.label]:.0f}" if args.ab else ""
                text, ratios[side.label] = row(side.label, n, runs[side.label], base, idle_ms)
                print(text, flush=True)
            line = f"served / in-process, charlm/{version} ({kind}), {n} session(s): "
            if args.ab:
                ab = [b / a for a, b in zip(ratios["A"], ratios["B"], strict=False)]
                line += f"A {sg.median(ratios['A']):.3f}, B {sg.median(ratios['B']):.3f}, B/A {sg.median(ab):.3f}"
            else:
                line += f"{sg.median(ratios['A']):.3f}"
            rounds = "; ".join(" ".join(f"{x:.3f}" for x in v) for v in ratios.values())
            summary.append(f"{line} (rounds: {rounds})")
        print(f"\npinning: {pinning}, in-process worker {worker_cpus}, load generator {cpus_of(os.getpid())}")
    finally:
        for side in sides:
            if side.server is not None:
                sg.cluster.stop(side.server)
                side.server = None
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=400, help="characters per served turn")
    parser.add_argument("--turns", type=int, default=5, help="turns per served session in each round")
    parser.add_argument("--in-process-steps", type=int, help="steps per in-process run (default: tokens x turns)")
    parser.add_argument("--server-cores", default="0", help="taskset list for the server and the in-process run")
    parser.add_argument("--client-cores", default="1", help="taskset list for the load generator (this process)")
    parser.add_argument("--server-python", default=sys.executable, help="the Python that runs the server(s)")
    parser.add_argument("--server-src", type=Path, default=ROOT, help="the checkout the server (A) runs from")
    parser.add_argument("--ab", type=Path, metavar="DIR", help="A/B: also a server from the checkout DIR (B)")
    parser.add_argument("--server-arg", action="append", default=[], help="an argument for the server(s), repeatable")
    parser.add_argument("--served-timeout-s", type=float, default=300.0, help="bound of one served run")
    parser.add_argument("--time-limit-s", type=float, default=10.0, help="bound of one in-process run")
    parser.add_argument("--budget-s", type=float, default=1800.0, help="no new round after this long")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 chars, 1 turn, 1 round")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(tokens=20, turns=1, rounds=1, time_limit_s=2.0)
    args = parser.parse_args(argv)
    args.in_process_steps = args.in_process_steps or max(20, args.tokens * args.turns)  # the served rows' length
    started, args.deadline = time.perf_counter(), time.monotonic() + args.budget_s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    sides = [Side("A", args.server_src.resolve(), args.server_python)]
    sides += [Side("B", args.ab.resolve(), args.server_python)] if args.ab else []
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# serve_pinned: served vs in-process on pinned cores\n\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"bench commit: {run_text(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'])}")
    print("\n".join(describe(side) for side in sides))
    print(f"machine: nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu_model}, {platform.machine()}")
    print(
        f"load average at start: {os.getloadavg()}; cores: server {args.server_cores} (--threads "
        f"{len(parse_cores(args.server_cores))}), in-process worker {args.server_cores}, load generator "
        f"{args.client_cores}; {args.tokens} chars x {args.turns} turn(s) per session, {args.in_process_steps} steps "
        f"in-process (at most {args.time_limit_s:g} s), {args.rounds} round(s); "
        f"server arguments: {' '.join(args.server_arg) or 'none'}",
        flush=True,
    )
    pin_process(parse_cores(args.client_cores))
    gc.freeze()  # the load generator shares this process with torch's heaps: keep the collector off them
    summary: list[str] = []
    pinned = {"initializer": pin_process, "initargs": (parse_cores(args.server_cores),)}  # all its threads
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), **pinned) as pool:
        for version in args.versions:
            summary += bench_version(args, version, sides, pool)
    print("\n" + "\n".join(summary))
    print(f"\nwall {time.perf_counter() - started:.0f} s; load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
