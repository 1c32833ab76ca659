"""Served classification (dynamic batching across clients) against batched in-process onnxruntime.

``--clients`` concurrent clients (default 64) each call Classify with one
sentence at a time for ``--seconds``; reported: sentences per second, p50 / p99
latency, the server process's CPU time per sentence (``/proc/<pid>/stat``, all
its threads) and the texts per model call (the server's ``lstm_batch_size``
histogram). In the same run, onnxruntime classifies the same sentences
in-process in batches of ``classify_max_batch`` (64), sorted by length, as the
server's batcher does: the ceiling, the fastest of ``--ceiling-passes`` passes
over the sentences.

``--server-src LABEL=DIR`` (repeatable) serves from the ``lstm_server`` package
under ``DIR`` (put first on the server's PYTHONPATH; e.g. a ``git archive`` of
another commit's ``server/src``) instead of this checkout's: one server per
source, started together, and ``--rounds`` rounds over them, in the order
ABBA, BAAB, ... so that noise hits every side alike. ``--version`` may be
repeated too (one server per version and source: an old entry against a new
one). With two or more sides, the ratio of each to the first is the median of
the per-round ratios, and each side's ceiling is its own version's.

    .venv/bin/python bench/serve_classify.py --sentences path/to/sst2/dev.tsv [--models models] [--version 2]
    .venv/bin/python bench/serve_classify.py --sentences path/to/sst2/dev.tsv --version 2 --rounds 6 \\
        --server-src before=/tmp/ab/before/server/src --server-src after=/tmp/ab/after/server/src
    .venv/bin/python bench/serve_classify.py --sentences path/to/sst2/dev.tsv --version 1 --version 3 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from serve_generation import cluster, percentile, process_cpu_s, start_server
from tokenizers import Tokenizer

from lstm_client import AsyncClient
from lstm_server.runtime.model_repository import load_entry

FALLBACK = ["a gorgeous , moving film", "dull and lifeless", "the best acting of the year", "it does n't work at all"]


def load_sentences(path: Path | None) -> list[str]:
    if path is None or not path.is_file():
        return FALLBACK * 64
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t", 1)[1] for line in lines if "\t" in line]


async def served(address: str, sentences: list[str], clients: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with AsyncClient(address) as client:
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> int:
            done = 0
            while time.perf_counter() < stop:
                text = sentences[(offset + done * clients) % len(sentences)]
                started = time.perf_counter()
                await client.classify([text])
                latencies.append(time.perf_counter() - started)
                done += 1
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(worker(i) for i in range(clients)))
        return sum(counts) / (time.perf_counter() - started), latencies


def in_process(models: Path, version: int, sentences: list[str], batch: int, threads: int, passes: int = 1) -> float:
    entry = load_entry(models / "sentiment" / str(version))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(entry.file("model.onnx")), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_str(entry.tokenizer_json())
    layers = entry.num_layers * entry.num_directions
    best = 0.0
    for _ in range(passes):
        started = time.perf_counter()
        encoded = sorted((tokenizer.encode(s).ids or [1] for s in sentences), key=len)
        for start in range(0, len(encoded), batch):
            chunk = encoded[start : start + batch]
            lengths = np.array([len(ids) for ids in chunk], np.int64)
            tokens = np.zeros((len(chunk), lengths.max()), np.int64)
            for row, ids in enumerate(chunk):
                tokens[row, : len(ids)] = ids
            zeros = np.zeros((layers, len(chunk), entry.hidden_size), np.float32)
            session.run(None, {"tokens": tokens, "lengths": lengths, "h0": zeros, "c0": zeros})
        best = max(best, len(sentences) / (time.perf_counter() - started))
    return best


def batch_metric(port: int) -> tuple[float, float]:
    """The server's ``lstm_batch_size`` histogram: (sum, count) of the texts per model call so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("lstm_batch_size_sum{", "lstm_batch_size_count{")) and 'model="sentiment"' in line:
            values[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("lstm_batch_size_sum", 0.0), values.get("lstm_batch_size_count", 0.0)


def stop_server(server: cluster.Process) -> None:
    """SIGTERM, then SIGKILL after 15 s. (``cluster.stop`` leaves an ``lstm-server`` started through its console
    script running: the process's argv[0] is the Python interpreter, so ``cluster.is_running`` says no.)"""
    cluster.stop(server)
    if not cluster.alive(server.pid):
        return
    os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while cluster.alive(server.pid):
        if time.monotonic() > deadline:
            os.kill(server.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--sentences", type=Path, required=True, help="an SST-2 TSV file: its sentences are sent")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--version", type=int, action="append", help="the sentiment version served and run in-process (default 1)"
    )
    parser.add_argument("--server-src", action="append", default=[], metavar="LABEL=DIR", help="see above")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ceiling-passes", type=int, default=3)
    args = parser.parse_args()
    sentences = load_sentences(args.sentences)
    versions = args.version or [1]
    sources = [
        (f"{label}, v{version}" if len(versions) > 1 else label, src, version)
        for label, src in [tuple(s.split("=", 1)) for s in args.server_src] or [("this checkout", "")]
        for version in versions
    ]
    ceilings = {v: in_process(args.models, v, sentences, 64, args.threads, args.ceiling_passes) for v in versions}
    servers, ports = [], []
    rates: list[list[float]] = [[] for _ in sources]
    latencies: list[list[float]] = [[] for _ in sources]
    cpu = [0.0] * len(sources)
    sentences_served = [0.0] * len(sources)
    calls = [[0.0, 0.0] for _ in sources]
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        for _, src, version in sources:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, pythonpath) if p)
            ports.append(cluster.free_port())
            servers.append(
                start_server(args.models, args.threads, f"sentiment={version}", ("--metrics-port", str(ports[-1])))
            )
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
        for server in servers:  # warm up: onnxruntime's first calls, the client's channel
            asyncio.run(served(server.address, sentences, args.clients, 1.0))
        for r in range(args.rounds):
            order = list(range(len(sources)))
            if r % 4 in (1, 2):
                order.reverse()
            for i in order:
                server = servers[i]
                before, (total, count) = process_cpu_s(server.pid), batch_metric(ports[i])
                rate, samples = asyncio.run(served(server.address, sentences, args.clients, args.seconds))
                cpu[i] += process_cpu_s(server.pid) - before
                after = batch_metric(ports[i])
                calls[i][0] += after[0] - total
                calls[i][1] += after[1] - count
                rates[i].append(rate)
                latencies[i] += samples
                sentences_served[i] += len(samples)
                print(f"round {r + 1}, {sources[i][0]}: {rate:,.0f} sentences/s", flush=True)
    finally:
        for server in servers:
            stop_server(server)
    print(
        f"\n{len(sentences)} sentences ({args.sentences if args.sentences.is_file() else 'built-in'}), "
        f"{args.clients} clients, {args.threads} threads, sentiment version(s) {versions}, "
        f"{args.rounds} round(s) of {args.seconds:g} s\n"
    )
    print(
        "| path | sentences/s | p50 ms | p99 ms | server CPU ms / sentence | texts / model call | served / in-process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for i, (label, _, version) in enumerate(sources):
        rate = statistics.median(rates[i])
        print(
            f"| served ({label}), {args.clients} clients x 1 sentence | {rate:,.0f} | "
            f"{1e3 * percentile(latencies[i], 50):.1f} | {1e3 * percentile(latencies[i], 99):.1f} | "
            f"{1e3 * cpu[i] / max(sentences_served[i], 1):.2f} | {calls[i][0] / max(calls[i][1], 1):.1f} | "
            f"{rate / ceilings[version]:.0%} |"
        )
    for version, ceiling in ceilings.items():
        print(
            f"| in-process onnxruntime, v{version}, batches of 64 (best of {args.ceiling_passes} passes) | "
            f"{ceiling:,.0f} | | | | | |"
        )
    for i in range(1, len(sources)):
        ratios = [b / a for a, b in zip(rates[0], rates[i], strict=True)]
        print(
            f"\n{sources[i][0]} / {sources[0][0]}: {statistics.median(ratios):.3f} (median of {len(ratios)} rounds; "
            f"min {min(ratios):.3f}, max {max(ratios):.3f}); server CPU per sentence "
            f"{(cpu[i] / sentences_served[i]) / (cpu[0] / sentences_served[0]):.3f}x"
        )


if __name__ == "__main__":
    main()
