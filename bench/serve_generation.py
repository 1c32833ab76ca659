"""Served generation against its limit in-process and against the naive approach, side by side in one run.

For each charlm version (``--versions``, default 1, the fp32 reference, and the default entry, the highest
version: the one the server serves when told nothing) one server process is started (``--model-versions
charlm=<version>`` plus any ``--server-arg``), and for each concurrency N (default 1, 16, 64, 256), round after
round (``--rounds``, default 3), one after the other so that noise hits every side alike:

- served: N sessions stream ``--tokens`` characters each from that server (``--turns`` turns one after the other,
  default 5: with one fresh turn per round the 1-session figure swung 2x); aggregate characters per second,
  time to first token (the Generate call to its first character), inter-token latency as a reader sees it (the
  first character of a message counts the whole gap since the previous message, the others in the same
  message a gap of 0) and as the old 'spread' figure (a message of k characters t seconds after the previous
  one counts k gaps of t / k; the first message left out); the load generator's own CPU time
  (``time.process_time()`` around the streaming: the client runs in this process) and the server process's
  (``/proc/<pid>/stat``, all its threads), per character served, and the server's split by thread (the event loop,
  the model threads, the others: onnxruntime's workers and gRPC's poller) in cores;
- single-step in-process: onnxruntime running the entry's step graph (``model.onnx``) at batch N one character
  at a time with the state carried, the next token the argmax (the ratio the targets have always used);
- decode in-process: onnxruntime running the entry's decode graph (``decode.onnx``) at batch N, K characters
  per row per call for each K of ``--decode-k`` (default 8, 16, 32), sampling in the graph (uniform draws from
  numpy, temperature 0.8 like the served sessions, every row all K steps), each call fed the last sampled
  column and the state it returned; skipped ("no decode graph") when the entry has none;
- the limit: the fastest of the single-step run and the decode runs (best K), the fastest way to run the same
  entry in-process at the same batch size;
- naive: N threads, each an eager PyTorch generate loop at batch 1 (the usual hand-written ``for`` loop with
  ``torch.multinomial``), on the fp32 weights (``charlm/1``'s ``model.pt``) whatever the version.

Then, per version, time to first token for a 1000-character prompt, served, against the in-process prefill of
the same prompt (one call of the step graph).

Throughputs are the median over the rounds; latency percentiles pool every round's samples; CPU per character
is the total over the rounds. Every loop is bounded: a served run by ``--served-timeout-s``, an in-process or
naive run by ``--time-limit-s`` (it stops early and counts what it did). The servers listen on loopback only.

    .venv/bin/python bench/serve_generation.py                     # fp32 and the default entry, 1-256 sessions
    .venv/bin/python bench/serve_generation.py --models models --versions 1 2 --concurrency 1 16 64 256
    .venv/bin/python bench/serve_generation.py --versions 2 --concurrency 1 16 --tokens 60 --naive-tokens 5
    .venv/bin/python bench/serve_generation.py --versions 2 --server-arg=--max-decode-steps=1   # a server option

``--server-arg`` (repeatable) passes one argument to every server started; write it with ``=`` when its value
starts with ``--`` (``--server-arg=--max-decode-steps=1``, or ``--server-arg=--stream-interval-ms
--server-arg=10``). To compare server options, run the command once per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstm_client import AsyncClient
from lstm_server.runtime.model_repository import DECODE_FILE, ModelEntry, list_entries, load_entry
from lstm_training.models import CharLM, CharLMConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
import cluster

PROMPT = "ROMEO:\n"
TEMPERATURE = 0.8  # the served sessions' and the decode graph's
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_server(
    models: Path,
    threads: int,
    versions: str = "",
    extra: tuple[str, ...] = (),
    prefix: tuple[str, ...] = (),
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> cluster.Process:
    """An lstm-server process on a free loopback port, serving (its log in a temporary folder); ``extra``
    options are passed on. ``prefix``: a program that execs the server, keeping its pid (``taskset -c 0``);
    ``python``: run ``<python> <its folder>/lstm-server`` instead of this venv's script; ``env``: added to the
    server's environment (``PYTHONPATH``: another checkout's server)."""
    port = cluster.free_port()
    script = str(Path(python or sys.executable).parent / "lstm-server")
    command = [*([python] if python else []), script, "--models", str(models), "--port", str(port)]
    command += [
        "--metrics-port",
        "0",
        "--threads",
        str(threads),
        "--log-level",
        "WARNING",
        "--drain-delay-s",
        "0",
    ]
    command += ["--model-versions", versions, *extra]
    # no HTTP port unless ``extra`` names one (a variable, not a flag: a checkout from before the HTTP port ignores it)
    env = {"LSTM_SERVER_HTTP_PORT": "0", **(env or {})}
    server = cluster.spawn(
        "bench-server", [*prefix, *command], port, Path(tempfile.mkdtemp(prefix="bench-server-")), env
    )
    # what runs once the prefix has exec'd: cluster.stop checks the process is still this program
    server = dataclasses.replace(server, command=command)
    cluster.wait_until_serving(server)
    return server


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (``/proc/<pid>/stat``); nan if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime: fields 14 and 15 of stat


def threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid``'s threads so far, by role: the event loop (the main thread: gRPC, streams,
    sessions), the model threads (named ``model-<name>`` for the OS by the server), and the others (onnxruntime's
    intra-op workers, gRPC's poller); empty if unreadable."""
    split = {"event loop": 0.0, "model threads": 0.0, "other threads": 0.0}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            role = "event loop" if task.name == str(pid) else "other threads"
            if (task / "comm").read_text().startswith("model-"):
                role = "model threads"
            split[role] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError):  # the process, or one of its threads, ended meanwhile
        return {}
    return split


async def served(
    address: str,
    concurrency: int,
    tokens: int,
    turn_prompt: str = "",
    server_pid: int | None = None,
    timeout_s: float = 300.0,
    turns: int = 1,
) -> dict:
    """N sessions stream ``tokens`` characters each at once, ``turns`` turns one after the other: the characters,
    the seconds, the samples (TTFT, inter-token gaps as seen and spread) and the CPU seconds of this process and of
    ``server_pid``."""
    ttft: list[float] = []
    seen: list[float] = []  # a message's first character: the gap since the previous message; the others: 0
    spread: list[float] = []  # k characters t seconds after the previous message: k gaps of t / k
    async with AsyncClient(address, timeout=timeout_s) as client:
        sessions = [await client.session(model="charlm", prompt=PROMPT).open() for _ in range(concurrency)]

        async def one(session, seed: int) -> int:
            total = 0
            for turn in range(turns):
                started = last = time.perf_counter()
                count = 0
                generation = session.generate(
                    turn_prompt, max_tokens=tokens, temperature=TEMPERATURE, seed=seed + 1_000_003 * turn
                )
                async for chunk in generation:
                    now = time.perf_counter()
                    if not chunk.text:
                        continue
                    k = len(chunk.text)
                    if count == 0:
                        ttft.append(now - started)
                    else:
                        seen.append(now - last)
                        spread.extend([(now - last) / k] * k)
                    seen.extend([0.0] * (k - 1))
                    count += k
                    last = now
                total += count
            return total

        server_cpu = process_cpu_s(server_pid) if server_pid else float("nan")
        threads_before = threads_cpu_s(server_pid) if server_pid else {}
        cpu = time.process_time()
        started = time.perf_counter()
        work = asyncio.gather(*(one(s, i) for i, s in enumerate(sessions)))
        counts = await asyncio.wait_for(work, timeout_s)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        server_cpu = (process_cpu_s(server_pid) if server_pid else float("nan")) - server_cpu
        threads_after = threads_cpu_s(server_pid) if server_pid else {}
        by_thread = {role: threads_after[role] - threads_before[role] for role in threads_before if threads_after}
        for session in sessions:
            await session.close()
    return {
        "chars": sum(counts),
        "seconds": elapsed,
        "ttft": ttft,
        "seen": seen,
        "spread": spread,
        "client_cpu_s": cpu,
        "server_cpu_s": server_cpu,
        "server_threads_cpu_s": by_thread,
    }


def in_process(
    session: ort.InferenceSession, layers: int, hidden: int, batch: int, steps: int, time_limit_s: float = 10.0
) -> float:
    """Characters per second of onnxruntime stepping ``batch`` rows with the state carried (``steps`` calls at
    most, stopping after ``time_limit_s``)."""
    h = np.zeros((layers, batch, hidden), np.float32)
    c = np.zeros_like(h)
    tokens = np.zeros((batch, 1), np.int64)
    for _ in range(3):
        _, h, c = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
    started = time.perf_counter()
    deadline = started + time_limit_s
    done = 0
    for _ in range(steps):
        logits, h, c = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
        tokens = logits[:, -1].argmax(axis=1)[:, None]
        done += 1
        if time.perf_counter() > deadline:
            break
    return batch * done / (time.perf_counter() - started)


def decode_in_process(
    session: ort.InferenceSession,
    layers: int,
    hidden: int,
    batch: int,
    k: int,
    calls: int,
    time_limit_s: float = 10.0,
    seed: int = 0,
) -> float:
    """Characters per second of the decode graph at ``batch`` rows, ``k`` characters per row per call (``calls``
    calls at most, stopping after ``time_limit_s``), each call fed the last sampled column and the state."""
    rng = np.random.default_rng(seed)
    fixed = {
        "temperature": np.full(batch, TEMPERATURE),
        "top_k": np.zeros(batch, np.int64),
        "top_p": np.ones(batch),
        "steps": np.full(batch, k, np.int64),
    }
    h = np.zeros((layers, batch, hidden), np.float32)
    c = np.zeros_like(h)
    tokens = np.zeros(batch, np.int64)

    def call() -> None:
        nonlocal tokens, h, c
        sampled, _, h, c = session.run(
            None, {"tokens": tokens, "h0": h, "c0": c, "draws": rng.random((batch, k)), **fixed}
        )
        tokens = sampled[:, -1]

    for _ in range(2):
        call()
    started = time.perf_counter()
    deadline = started + time_limit_s
    done = 0
    for _ in range(calls):
        call()
        done += 1
        if time.perf_counter() > deadline:
            break
    return batch * k * done / (time.perf_counter() - started)


def naive(model: CharLM, index: dict[str, int], concurrency: int, tokens: int, time_limit_s: float = 10.0) -> float:
    """Characters per second of ``concurrency`` threads, each an eager generate loop at batch 1 (``tokens``
    characters at most, stopping after ``time_limit_s``)."""
    counts = [0] * concurrency
    deadline = time.perf_counter() + time_limit_s

    def generate(row: int) -> None:
        generator = torch.Generator().manual_seed(row)
        with torch.inference_mode():
            h, c = model.initial_state(1)
            logits, h, c = model(torch.tensor([[index[ch] for ch in PROMPT]]), h, c)
            for _ in range(tokens):
                probs = torch.softmax(logits[0, -1] / TEMPERATURE, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
                logits, h, c = model(token.view(1, 1), h, c)
                counts[row] += 1
                if time.perf_counter() > deadline:
                    break

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def describe(entry: ModelEntry, default: int) -> str:
    kind = "int8" if "quantization" in entry.manifest else "fp32"
    return f"charlm/{entry.version} ({kind}{', the default entry' if entry.version == default else ''})"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_char_us(seconds: float, chars: int) -> str:
    return "n/a" if chars == 0 or seconds != seconds else f"{1e6 * seconds / chars:.0f}"


def bench_version(args: argparse.Namespace, entry: ModelEntry, default: int, eager: CharLM) -> None:
    """One server for ``entry``; the table over ``args.concurrency``, then the long-prompt TTFT."""
    index = {ch: i for i, ch in enumerate(entry.vocab)}
    layers, hidden = entry.num_layers, entry.hidden_size
    step = onnx_session(entry.file("model.onnx"), args.threads)
    decode = onnx_session(entry.file(DECODE_FILE), args.threads) if entry.has_decode_graph else None
    print(f"\n## {describe(entry, default)}: {entry.path}\n")
    server = start_server(args.models, args.threads, f"charlm={entry.version}", tuple(args.server_arg))
    notes: list[str] = []
    try:
        print(
            "| sessions | served chars/s | single-step in-process chars/s | decode in-process chars/s (best K) "
            "| limit | served / limit | served / single-step | served / naive | TTFT p50/p99 ms "
            "| ITL p50/p99 ms (as seen) | ITL p99 spread ms | client CPU us/char | server CPU us/char |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.concurrency:
            runs: list[dict] = []
            single: list[float] = []
            by_k: dict[int, list[float]] = {k: [] for k in args.decode_k}
            steps = max(20, 2000 // n)  # characters per row in-process
            for round_ in range(args.rounds):
                runs.append(
                    asyncio.run(
                        served(server.address, n, args.tokens, "", server.pid, args.served_timeout_s, args.turns)
                    )
                )
                single.append(in_process(step, layers, hidden, n, steps, args.time_limit_s))
                for k in args.decode_k if decode is not None else ():
                    calls = max(3, -(-steps // k))
                    by_k[k].append(decode_in_process(decode, layers, hidden, n, k, calls, args.time_limit_s, round_))
            baseline = naive(eager, index, n, args.naive_tokens, args.time_limit_s)
            chars = sum(r["chars"] for r in runs)
            rate = median([r["chars"] / r["seconds"] for r in runs])
            ttft = [t for r in runs for t in r["ttft"]]
            seen = [g for r in runs for g in r["seen"]]
            spread = [g for r in runs for g in r["spread"]]
            step_rate = median(single)
            decode_rates = {k: median(v) for k, v in by_k.items() if v}
            if decode_rates:
                best_k = max(decode_rates, key=decode_rates.__getitem__)
                decode_cell = f"{decode_rates[best_k]:,.0f} (K={best_k})"
                limit = max(step_rate, decode_rates[best_k])
            else:
                decode_cell, limit = "no decode graph", step_rate
            print(
                f"| {n} | {rate:,.0f} | {step_rate:,.0f} | {decode_cell} | {limit:,.0f} | {rate / limit:.0%} "
                f"| {rate / step_rate:.0%} | {rate / baseline:.1f}x "
                f"| {1e3 * percentile(ttft, 50):.1f} / {1e3 * percentile(ttft, 99):.1f} "
                f"| {1e3 * percentile(seen, 50):.2f} / {1e3 * percentile(seen, 99):.2f} "
                f"| {1e3 * percentile(spread, 99):.2f} "
                f"| {per_char_us(sum(r['client_cpu_s'] for r in runs), chars)} "
                f"| {per_char_us(sum(r['server_cpu_s'] for r in runs), chars)} |",
                flush=True,
            )
            seconds = sum(r["seconds"] for r in runs)
            client_cores = sum(r["client_cpu_s"] for r in runs) / seconds
            server_cores = sum(r["server_cpu_s"] for r in runs) / seconds
            roles = runs[0]["server_threads_cpu_s"]
            split = ", ".join(
                f"{role} {sum(r['server_threads_cpu_s'].get(role, 0.0) for r in runs) / seconds:.2f}" for role in roles
            )
            by_k_text = ", ".join(f"K={k} {rate_k:,.0f}" for k, rate_k in decode_rates.items()) or "no decode graph"
            notes.append(
                f"- {n} session{'s' if n > 1 else ''}: naive {baseline:,.0f} chars/s; decode in-process {by_k_text}; "
                f"while serving, the client used {client_cores:.2f} cores and the server {server_cores:.2f}"
                + (f" ({split})" if split else "")
            )
        print("\n" + "\n".join(notes))
        long_prompt = ("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)[:1000]
        ttft = []
        for _ in range(5):
            run = asyncio.run(served(server.address, 1, 1, long_prompt, timeout_s=args.served_timeout_s))
            ttft.extend(run["ttft"])
        prefill = []
        ids = np.array([[index[ch] for ch in long_prompt]], np.int64)
        zeros = np.zeros((layers, 1, hidden), np.float32)
        for _ in range(5):
            started = time.perf_counter()
            step.run(None, {"tokens": ids, "h0": zeros, "c0": zeros})
            prefill.append(time.perf_counter() - started)
        served_ttft, prefill_s = median(ttft), median(prefill)
        print(
            f"\nTTFT, 1000-character prompt: served {1e3 * served_ttft:.1f} ms (median of 5: the Generate call to "
            f"its first character), in-process prefill {1e3 * prefill_s:.1f} ms, ratio {served_ttft / prefill_s:.2f}x"
        )
    finally:
        cluster.stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument(
        "--versions", type=int, nargs="+", help="charlm versions, one server each (default: 1 and the default entry)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=200, help="characters per served session")
    parser.add_argument(
        "--turns", type=int, default=5, help="turns per served session, one after the other, in each round"
    )
    parser.add_argument("--naive-tokens", type=int, default=40, help="characters per naive request")
    parser.add_argument("--decode-k", type=int, nargs="+", default=[8, 16, 32], help="decode graph K in-process")
    parser.add_argument("--rounds", type=int, default=3, help="served and in-process runs per concurrency")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--server-arg", action="append", default=[], help="an argument for the server (repeatable): --server-arg=--x=1"
    )
    parser.add_argument("--served-timeout-s", type=float, default=300.0, help="bound of one served run")
    parser.add_argument("--time-limit-s", type=float, default=10.0, help="bound of one in-process or naive run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = list_entries(args.models).get("charlm", [1])[-1]
    versions = args.versions or sorted({1, default})
    entries = [load_entry(args.models / "charlm" / str(version)) for version in versions]
    fp32 = load_entry(args.models / "charlm" / "1")  # the naive loop runs the fp32 weights in eager PyTorch
    eager = CharLM(CharLMConfig(**fp32.manifest["model_config"]))
    eager.load_state_dict(torch.jit.load(str(fp32.file("model.pt"))).state_dict())
    eager.eval()
    gc.freeze()  # the load generator shares this process with torch's heaps: keep the collector off them
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads (server and in-process); "
        f"{args.tokens} chars per turn, {args.turns} turn(s) per session, {args.naive_tokens} per naive request, "
        f"{args.rounds} round(s); "
        f"server arguments: {' '.join(args.server_arg) or 'none'}"
    )
    for entry in entries:
        bench_version(args, entry, default, eager)


if __name__ == "__main__":
    main()
