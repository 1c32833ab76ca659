"""Triton's perf_analyzer against the server's KServe v2 endpoint, side by side with the Python load generators.

One server process on loopback (``--models``, its defaults unless ``--server-arg``), serving ``charlm`` and
``sentiment`` on one port, both its own ``lstm.v1`` API and the KServe v2 / Triton ``inference.GRPCInferenceService``.
perf_analyzer (``make perf-analyzer`` installs it in ``.perf-analyzer/``) drives the KServe service with ``-i grpc``;
for every concurrency, round after round (``--rounds``), it and Python load generators take turns against the same
server, so that the machine's noise hits every side alike:

- generation (``charlm``, decoupled, a sequence model): perf_analyzer with ``--streaming``, sequences of
  ``--sequence-length`` turns (``--serial-sequences``: one turn in flight per sequence; ``--sequence-id-range``),
  the turns' TEXT from ``bench/perf_analyzer_data/charlm.json`` (one data stream per sequence: a speaker's cue per
  turn), ``max_tokens`` and ``seed`` as request parameters (``--request-parameter NAME:VALUE:int``) and the
  temperature (0.8, as ``serve_generation.py``) as a string (``temperature:0.8:string``: perf_analyzer 2.60 sends
  only int, bool and string parameters, a ``:double`` one is dropped without a word; the server reads a number from
  a string), at each ``--gen-concurrency`` (default 1 and 64). Against it, ``bench/serve_generation.py``'s
  ``served()``: N sessions of the ``lstm.v1`` API (``lstm_client.AsyncClient``, in this process), each streaming
  one turn of the same ``--max-tokens`` characters, repeated until as many seconds have been streamed as
  perf_analyzer measured (its sessions are opened before its clock starts, perf_analyzer's inside its windows);
  and perf_analyzer's own workload from Python on the same KServe service: tritonclient's asyncio client, N
  sequences of the same turns on one ``ModelStreamInfer`` stream (temperature as a double), so that the load
  generator (C++ against Python) and the protocol (KServe against lstm.v1) can be told apart;
- classification (``sentiment``): perf_analyzer with one sentence per request (``bench/perf_analyzer_data/
  sentiment.json``) at each ``--cls-concurrency`` (default 1, 16, 64), against ``bench/serve_classify.py``'s
  ``served()`` (N ``Classify`` callers, one sentence each) for the same seconds, and the same loop on KServe's
  ``ModelInfer`` through tritonclient's asyncio client.

``--skip-python`` runs perf_analyzer alone; ``--address`` (and ``--server-pid``) points it at a server already
running instead of starting one.

perf_analyzer measures ``--windows`` windows of ``--window-ms`` (after ``--warmup-requests`` per concurrency
slot), and stability is not asked for (``-s 1000``): the rounds and the medians are this script's. Its profile
export (every request with its response timestamps and TEXT_OUT) gives the figures: requests per second (a
request is a turn, complete at its final response), characters per second (the TEXT_OUT characters received in
the windows), time to first token (the request to its first response), the whole turn's latency (to its final
response), and the inter-token latency as seen (as in ``serve_generation.py``: the first
character of a message counts the gap since the previous message, the others 0). The CPU time of the load generator
(perf_analyzer's process, every thread; or this process, ``time.process_time()``) and of the server
(``/proc/<pid>/stat``) are taken over the same span: for perf_analyzer, sampled every 20 ms and interpolated to its
measurement windows; reported as cores (CPU seconds per second) and microseconds per character (or per sentence).

Every run is bounded: a perf_analyzer run by ``--pa-timeout-s`` (killed after it), a Python run by the same
seconds; the defaults took six minutes on two busy cores. The server and every perf_analyzer started are stopped
at the end, also on an error or Ctrl-C.

    make perf-analyzer && .venv/bin/python bench/perf_analyzer.py
    .venv/bin/python bench/perf_analyzer.py --gen-concurrency 1 64 --cls-concurrency 1 16 64 --rounds 2
    .venv/bin/python bench/perf_analyzer.py --skip-classify --max-tokens 200 --window-ms 5000
    .venv/bin/python bench/perf_analyzer.py --server-arg=--threads=1 --pa-arg=--request-parameter=top_k:40:int
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from serve_classify import served as classify_served
from serve_classify import stop_server
from serve_generation import TEMPERATURE, percentile, process_cpu_s, start_server
from serve_generation import served as generation_served

REPO = Path(__file__).resolve().parent.parent
PA = "perf_analyzer (KServe, C++)"
SERVED = "serve_generation.py served() (lstm.v1, Python)"
KSERVE = "tritonclient asyncio (KServe, Python)"
DATA = REPO / "bench" / "perf_analyzer_data"
DEFAULT_BINARY = REPO / ".perf-analyzer" / "bin" / "perf_analyzer"


@dataclass
class Samples:
    """CPU seconds of perf_analyzer and of the server at wall-clock instants (ns since the epoch)."""

    t_ns: list[int] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)

    def between(self, which: list[float], start_ns: int, end_ns: int) -> float:
        """CPU seconds spent from ``start_ns`` to ``end_ns`` (linear between samples); nan without samples."""
        points = [(t, v) for t, v in zip(self.t_ns, which, strict=True) if v == v]
        if len(points) < 2:
            return float("nan")
        t = np.array([p[0] for p in points], dtype=np.float64)
        v = np.array([p[1] for p in points])
        return float(np.interp(end_ns, t, v) - np.interp(start_ns, t, v))


def run_perf_analyzer(binary: Path, args: list[str], server_pid: int, timeout_s: float) -> tuple[dict, str, Samples]:
    """perf_analyzer with ``args`` plus a profile export; (the export's experiment, its output, CPU samples).
    Killed after ``timeout_s``; raises if it fails or exports nothing."""
    samples = Samples()
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        export = Path(tmp) / "export.json"
        log = Path(tmp) / "output.txt"
        command = [str(binary), *args, "--profile-export-file", str(export)]
        with open(log, "w") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        try:
            while child.poll() is None:
                if time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    raise RuntimeError(f"perf_analyzer ran past {timeout_s:g} s: {' '.join(command)}")
                samples.t_ns.append(time.time_ns())
                samples.load.append(process_cpu_s(child.pid))
                samples.server.append(process_cpu_s(server_pid))
                time.sleep(0.02)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        output = log.read_text(errors="replace")
        if child.returncode != 0 or not export.is_file():
            raise RuntimeError(f"perf_analyzer failed (exit {child.returncode}): {' '.join(command)}\n{output}")
        experiment = json.loads(export.read_text())["experiments"][-1]
    return experiment, output, samples


def windows(experiment: dict) -> tuple[int, int]:
    """The span perf_analyzer reported: its last three measurement windows (all of them if fewer)."""
    bounds = experiment["window_boundaries"]
    return bounds[max(0, len(bounds) - 4)], bounds[-1]


def generation_figures(experiment: dict, samples: Samples, output_key: str = "TEXT_OUT") -> dict:
    """Characters, turns, latencies and CPU of one perf_analyzer run, over its measurement windows."""
    start, end = windows(experiment)
    seconds = (end - start) / 1e9
    chars = turns = messages = 0
    ttft, turn_latency, seen = [], [], []
    for request in experiment["requests"]:
        stamps = request.get("response_timestamps", [])
        outputs = request.get("response_outputs", [])
        texts = [str(o.get(output_key, "")) for o in outputs]
        in_window = [text for text, t in zip(texts, stamps, strict=False) if start <= t <= end]
        chars += sum(len(text) for text in in_window)
        messages += sum(1 for text in in_window if text)
        if not stamps:
            continue
        if start <= stamps[-1] <= end:
            turns += 1
        if not start <= request["timestamp"] <= end:
            continue
        ttft.append((stamps[0] - request["timestamp"]) / 1e9)
        turn_latency.append((stamps[-1] - request["timestamp"]) / 1e9)
        last = None
        for text, t in zip(texts, stamps, strict=False):
            if not text:
                continue
            if last is not None:
                seen.append((t - last) / 1e9)
                seen.extend([0.0] * (len(text) - 1))
            else:
                seen.extend([0.0] * (len(text) - 1))
            last = t
    return {
        "chars": chars,
        "seconds": seconds,
        "turns": turns,
        "messages": messages,
        "ttft": ttft,
        "turn": turn_latency,
        "seen": seen,
        "load_cpu_s": samples.between(samples.load, start, end),
        "server_cpu_s": samples.between(samples.server, start, end),
    }


def classify_figures(experiment: dict, samples: Samples) -> dict:
    start, end = windows(experiment)
    latencies, done = [], 0
    for request in experiment["requests"]:
        stamps = request.get("response_timestamps", [])
        if stamps and start <= stamps[-1] <= end:
            done += 1
            latencies.append((stamps[-1] - request["timestamp"]) / 1e9)
    return {
        "sentences": done,
        "seconds": (end - start) / 1e9,
        "latency": latencies,
        "load_cpu_s": samples.between(samples.load, start, end),
        "server_cpu_s": samples.between(samples.server, start, end),
    }


def common_args(args: argparse.Namespace, address: str, model: str, concurrency: int) -> list[str]:
    return [
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        model,
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(args.window_ms),
        "--stability-percentage",
        "1000",  # no stability search: a fixed number of windows, the rounds are ours
        "--max-trials",
        str(args.windows),
    ]


def pa_generation(args: argparse.Namespace, address: str, server_pid: int, concurrency: int) -> dict:
    pa_args = [
        *common_args(args, address, "charlm", concurrency),
        "--streaming",
        "--input-data",
        str(args.gen_data),
        "--sequence-length",
        str(args.sequence_length),
        "--sequence-length-variation",
        "0",
        "--sequence-id-range",
        args.sequence_id_range,
        "--serial-sequences",
        "--warmup-request-count",
        str(args.warmup_requests * concurrency),
        "--request-parameter",
        f"max_tokens:{args.max_tokens}:int",
        "--request-parameter",
        f"seed:{args.seed}:int",
        "--request-parameter",  # perf_analyzer sends no doubles: a number as a string, which the server accepts
        f"temperature:{args.temperature}:string",
        *args.pa_arg,
    ]
    experiment, output, samples = run_perf_analyzer(args.perf_analyzer, pa_args, server_pid, args.pa_timeout_s)
    figures = generation_figures(experiment, samples)
    figures["output"] = output
    return figures


def pa_classify(args: argparse.Namespace, address: str, server_pid: int, concurrency: int) -> dict:
    pa_args = [
        *common_args(args, address, "sentiment", concurrency),
        "--input-data",
        str(args.cls_data),
        "--warmup-request-count",
        str(args.warmup_requests * concurrency),
    ]
    experiment, output, samples = run_perf_analyzer(args.perf_analyzer, pa_args, server_pid, args.pa_timeout_s)
    figures = classify_figures(experiment, samples)
    figures["output"] = output
    return figures


def python_generation(address: str, server_pid: int, concurrency: int, tokens: int, seconds: float) -> dict:
    """``serve_generation.served`` (N sessions, one turn of ``tokens`` characters each) again and again until
    ``seconds`` have been streamed; totals of its figures."""
    total = {"chars": 0, "seconds": 0.0, "ttft": [], "seen": [], "client_cpu_s": 0.0, "server_cpu_s": 0.0}
    while total["seconds"] < seconds:
        run = asyncio.run(generation_served(address, concurrency, tokens, "", server_pid, timeout_s=seconds + 60))
        for key in ("chars", "seconds", "client_cpu_s", "server_cpu_s"):
            total[key] += run[key]
        total["ttft"] += run["ttft"]
        total["seen"] += run["seen"]
    return total


async def kserve_generation(
    address: str,
    server_pid: int,
    concurrency: int,
    tokens: int,
    seconds: float,
    streams: list[list[str]],
    sequence_length: int,
    seed: int,
    temperature: float,
    warmup_s: float = 1.0,
) -> dict:
    """perf_analyzer's workload from Python: tritonclient's asyncio client on one ModelStreamInfer stream,
    ``concurrency`` slots each running sequences of ``sequence_length`` turns (the turns' texts from ``streams``,
    round-robin), one turn in flight per sequence, for ``warmup_s`` and then ``seconds`` measured: the
    characters received in those seconds, the turns that ended in them, and the CPU of this process and the
    server over them."""
    from tritonclient.grpc import InferInput
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(address)
    outbox: asyncio.Queue = asyncio.Queue()
    waiting: dict[str, asyncio.Queue] = {}
    window = {"open": False}
    figures = {"chars": 0, "turns": 0, "ttft": [], "seen": []}

    async def requests():
        while (item := await outbox.get()) is not None:
            yield item

    async def slot(index: int) -> None:
        sequence = index
        while True:
            texts = streams[sequence % len(streams)]
            sequence_id = 1_000_000 + sequence  # apart from perf_analyzer's ids, in case a sequence outlives a run
            sequence += concurrency
            for turn in range(sequence_length):
                text = InferInput("TEXT", [1], "BYTES")
                text.set_data_from_numpy(np.array([texts[turn % len(texts)].encode()], dtype=np.object_))
                request_id = f"{sequence_id}-{turn}"
                inbox = waiting[request_id] = asyncio.Queue()
                started = last = time.perf_counter()
                first = True
                await outbox.put(
                    {
                        "model_name": "charlm",
                        "inputs": [text],
                        "request_id": request_id,
                        "sequence_id": sequence_id,
                        "sequence_start": turn == 0,
                        "sequence_end": turn == sequence_length - 1,
                        "parameters": {"max_tokens": tokens, "seed": seed, "temperature": float(temperature)},
                    }
                )
                while True:
                    result, final = await inbox.get()
                    now = time.perf_counter()
                    out = result.as_numpy("TEXT_OUT")
                    chunk = out[0].decode() if out is not None and len(out) else ""
                    if chunk and window["open"]:
                        figures["chars"] += len(chunk)
                        if first:
                            figures["ttft"].append(now - started)
                        else:
                            figures["seen"].append(now - last)
                        figures["seen"].extend([0.0] * (len(chunk) - 1))
                    if chunk:
                        first, last = False, now
                    if final:
                        break
                del waiting[request_id]
                if window["open"]:
                    figures["turns"] += 1

    async def route() -> None:
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                raise RuntimeError(f"stream error: {error}")
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            await waiting[response.id].put((result, final))

    tasks = [asyncio.create_task(route())] + [asyncio.create_task(slot(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        for task in tasks:
            if task.done():
                task.result()
        server_cpu, cpu, started = process_cpu_s(server_pid), time.process_time(), time.perf_counter()
        window["open"] = True
        await asyncio.sleep(seconds)
        window["open"] = False
        elapsed = time.perf_counter() - started
        figures.update(
            seconds=elapsed,
            client_cpu_s=time.process_time() - cpu,
            server_cpu_s=process_cpu_s(server_pid) - server_cpu,
        )
        for task in tasks:
            if task.done():
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await outbox.put(None)
        await client.close()
    return figures


def python_classify(address: str, server_pid: int, sentences: list[str], clients: int, seconds: float) -> dict:
    server_cpu = process_cpu_s(server_pid)
    cpu = time.process_time()
    rate, latencies = asyncio.run(classify_served(address, sentences, clients, seconds))
    return {
        "sentences": len(latencies),
        "seconds": len(latencies) / rate if rate else float("nan"),
        "latency": latencies,
        "load_cpu_s": time.process_time() - cpu,
        "server_cpu_s": process_cpu_s(server_pid) - server_cpu,
    }


async def kserve_classify(address: str, server_pid: int, sentences: list[str], clients: int, seconds: float) -> dict:
    """``serve_classify.served()``'s loop on the KServe service: ``clients`` callers of ModelInfer (tritonclient's
    asyncio client, one channel), one sentence each, for ``seconds``."""
    from tritonclient.grpc import InferInput
    from tritonclient.grpc.aio import InferenceServerClient

    latencies: list[float] = []
    client = InferenceServerClient(address)
    try:
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> int:
            done = 0
            while time.perf_counter() < stop:
                text = InferInput("TEXT", [1], "BYTES")
                sentence = sentences[(offset + done * clients) % len(sentences)]
                text.set_data_from_numpy(np.array([sentence.encode()], dtype=np.object_))
                started = time.perf_counter()
                await client.infer("sentiment", [text])
                latencies.append(time.perf_counter() - started)
                done += 1
            return done

        server_cpu, cpu, started = process_cpu_s(server_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        return {
            "sentences": len(latencies),
            "seconds": time.perf_counter() - started,
            "latency": latencies,
            "load_cpu_s": time.process_time() - cpu,
            "server_cpu_s": process_cpu_s(server_pid) - server_cpu,
        }
    finally:
        await client.close()


def check_kserve(address: str) -> None:
    """Exit with a message unless the server answers the KServe v2 service for both models."""
    import tritonclient.grpc as triton

    try:
        client = triton.InferenceServerClient(address)
        if not client.is_server_live():
            raise RuntimeError("ServerLive says not live")
        for model in ("charlm", "sentiment"):
            client.get_model_metadata(model)
        client.close()
    except Exception as error:  # any failure means the same: nothing to measure
        sys.exit(f"the server does not answer inference.GRPCInferenceService (KServe v2) at {address}: {error}")


def ms(values: list[float], q: float) -> str:
    return f"{1e3 * percentile(values, q):.1f}" if values else "n/a"


def us_per(cpu_s: float, count: float) -> str:
    return "n/a" if not count or cpu_s != cpu_s else f"{1e6 * cpu_s / count:.0f}"


def cores(cpu_s: float, seconds: float) -> str:
    return "n/a" if not seconds or cpu_s != cpu_s else f"{cpu_s / seconds:.2f}"


def total(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs)


def pooled(runs: list[dict], key: str) -> list[float]:
    return [x for r in runs for x in r[key]]


def generation_row(n: int, label: str, runs: list[dict]) -> str:
    """One line of the generation table: rates are the median over the rounds, latencies pool every round's
    samples, CPU is the total over the rounds."""
    seconds, chars = total(runs, "seconds"), total(runs, "chars")
    rate = statistics.median(r["chars"] / r["seconds"] for r in runs)
    turns = statistics.median(r["turns"] / r["seconds"] for r in runs)
    turn = pooled(runs, "turn")
    return (
        f"| {n} | {label} | {rate:,.0f} | {turns:,.1f} | {chars / max(total(runs, 'messages'), 1):.1f} "
        f"| {ms(pooled(runs, 'ttft'), 50)} / {ms(pooled(runs, 'ttft'), 99)} "
        f"| {f'{ms(turn, 50)} / {ms(turn, 99)}' if turn else 'n/a'} | {ms(pooled(runs, 'seen'), 99)} "
        f"| {cores(total(runs, 'load_cpu_s'), seconds)} | {cores(total(runs, 'server_cpu_s'), seconds)} "
        f"| {us_per(total(runs, 'load_cpu_s'), chars)} | {us_per(total(runs, 'server_cpu_s'), chars)} |"
    )


def messages(run: dict) -> int:
    """Messages with text, from a Python side's samples: the first of each turn (a TTFT) and every later one
    (an inter-token gap above 0)."""
    return len(run["ttft"]) + sum(1 for gap in run["seen"] if gap > 0)


def generation_table(args: argparse.Namespace, address: str, server_pid: int) -> None:
    streams = [[step["TEXT"][0] for step in stream] for stream in json.loads(args.gen_data.read_text())["data"]]
    print(
        f"\n## charlm: {args.max_tokens} characters per turn, sequences of {args.sequence_length} turns "
        f"(perf_analyzer, tritonclient), {args.windows} windows of {args.window_ms} ms, {args.rounds} round(s)\n"
    )
    print(
        "| sessions | load generator | chars/s (median) | turns/s | chars / message | TTFT p50/p99 ms "
        "| turn p50/p99 ms | ITL p99 ms (as seen) | load generator cores | server cores "
        "| load generator CPU us/char | server CPU us/char |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for n in args.gen_concurrency:
        sides: dict[str, list[dict]] = {PA: [], SERVED: [], KSERVE: []}
        for round_ in range(args.rounds):
            pa = pa_generation(args, address, server_pid, n)
            sides[PA].append(pa)
            line = f"  ({n} sessions, round {round_ + 1}: perf_analyzer {pa['chars'] / pa['seconds']:,.0f} chars/s"
            if not args.skip_python:
                py = python_generation(address, server_pid, n, args.max_tokens, pa["seconds"])
                py.update(load_cpu_s=py["client_cpu_s"], turns=py["chars"] / args.max_tokens, messages=messages(py))
                py["turn"] = []
                sides[SERVED].append(py)
                kserve = asyncio.run(
                    kserve_generation(
                        address,
                        server_pid,
                        n,
                        args.max_tokens,
                        pa["seconds"],
                        streams,
                        args.sequence_length,
                        args.seed,
                        float(args.temperature),
                    )
                )
                kserve.update(load_cpu_s=kserve["client_cpu_s"], messages=messages(kserve), turn=[])
                sides[KSERVE].append(kserve)
                line += f", lstm.v1 Python {py['chars'] / py['seconds']:,.0f}, KServe Python "
                line += f"{kserve['chars'] / kserve['seconds']:,.0f}"
            print(line + ")", flush=True)
        for label, runs in sides.items():
            if runs:
                print(generation_row(n, label, runs), flush=True)
        note = f"- {n} session{'s' if n > 1 else ''}: perf_analyzer's summary of the last round: "
        note += summary_line(sides[PA][-1]["output"])
        for label in (SERVED, KSERVE):
            if sides[label]:
                ratios = [
                    a["chars"] / a["seconds"] / (b["chars"] / b["seconds"])
                    for a, b in zip(sides[PA], sides[label], strict=True)
                ]
                note += f"; perf_analyzer / {label.split(' (')[0]} chars/s per round: "
                note += ", ".join(f"{r:.2f}" for r in ratios)
        notes.append(note)
    print("\n" + "\n".join(notes))


def classify_table(args: argparse.Namespace, address: str, server_pid: int) -> None:
    sentences = [row["TEXT"]["content"][0] for row in json.loads(args.cls_data.read_text())["data"]]
    print(
        f"\n## sentiment: one sentence per request, {args.windows} windows of {args.window_ms} ms, "
        f"{args.rounds} round(s)\n"
    )
    print(
        "| callers | load generator | sentences/s (median) | latency p50/p99 ms | load generator cores "
        "| server cores | load generator CPU us/sentence | server CPU us/sentence |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    labels = (PA, "serve_classify.py served() (lstm.v1, Python)", KSERVE)
    for n in args.cls_concurrency:
        sides: dict[str, list[dict]] = {label: [] for label in labels}
        for _ in range(args.rounds):
            pa = pa_classify(args, address, server_pid, n)
            sides[PA].append(pa)
            if not args.skip_python:
                sides[labels[1]].append(python_classify(address, server_pid, sentences, n, pa["seconds"]))
                sides[KSERVE].append(asyncio.run(kserve_classify(address, server_pid, sentences, n, pa["seconds"])))
        for label, runs in sides.items():
            if not runs:
                continue
            seconds, count = total(runs, "seconds"), total(runs, "sentences")
            latency = pooled(runs, "latency")
            print(
                f"| {n} | {label} | {statistics.median(r['sentences'] / r['seconds'] for r in runs):,.0f} "
                f"| {ms(latency, 50)} / {ms(latency, 99)} "
                f"| {cores(total(runs, 'load_cpu_s'), seconds)} | {cores(total(runs, 'server_cpu_s'), seconds)} "
                f"| {us_per(total(runs, 'load_cpu_s'), count)} | {us_per(total(runs, 'server_cpu_s'), count)} |",
                flush=True,
            )
        notes.append(
            f"- {n} caller{'s' if n > 1 else ''}: perf_analyzer's summary of the last round: "
            f"{summary_line(sides[PA][-1]['output'])}"
        )
    print("\n" + "\n".join(notes))


def summary_line(output: str) -> str:
    """perf_analyzer's own last line ('Concurrency: N, throughput: X infer/sec, latency Y usec')."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("Concurrency:")]
    return lines[-1] if lines else "(none)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--perf-analyzer", type=Path, default=DEFAULT_BINARY, help="the binary (make perf-analyzer)")
    parser.add_argument("--gen-concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--cls-concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-classify", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=64, help="characters per turn (the max_tokens parameter)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--temperature", default=TEMPERATURE, help="sent as a string parameter (no doubles in PA)")
    parser.add_argument("--sequence-length", type=int, default=4, help="turns per perf_analyzer sequence")
    parser.add_argument("--sequence-id-range", default="1:100000", help="perf_analyzer's START:END")
    parser.add_argument("--gen-data", type=Path, default=DATA / "charlm.json")
    parser.add_argument("--cls-data", type=Path, default=DATA / "sentiment.json")
    parser.add_argument("--window-ms", type=int, default=3000, help="one perf_analyzer measurement window")
    parser.add_argument("--windows", type=int, default=3, help="measurement windows per perf_analyzer run (>= 3)")
    parser.add_argument("--warmup-requests", type=int, default=2, help="warm-up requests per concurrency slot")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's --threads")
    parser.add_argument("--server-arg", action="append", default=[], help="an argument for the server (repeatable)")
    parser.add_argument("--pa-arg", action="append", default=[], help="an argument for perf_analyzer (repeatable)")
    parser.add_argument("--pa-timeout-s", type=float, default=120.0, help="bound of one perf_analyzer run")
    parser.add_argument("--address", help="a server already running (HOST:PORT) instead of starting one")
    parser.add_argument("--server-pid", type=int, default=0, help="with --address: its pid, for its CPU time")
    parser.add_argument("--skip-python", action="store_true", help="perf_analyzer only (no side-by-side runs)")
    args = parser.parse_args()
    if args.windows < 3:
        parser.error("--windows must be at least 3 (perf_analyzer's stability check needs three)")
    if not os.access(args.perf_analyzer, os.X_OK):
        sys.exit(f"no perf_analyzer at {args.perf_analyzer}: run `make perf-analyzer` first")
    version = subprocess.run([str(args.perf_analyzer), "--version"], capture_output=True, text=True, timeout=30)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, server --threads {args.threads}; "
        f"{version.stdout.strip() or version.stderr.strip()} ({args.perf_analyzer}); "
        f"server arguments: {' '.join(args.server_arg) or 'none'}; perf_analyzer extra arguments: "
        f"{' '.join(args.pa_arg) or 'none'}"
    )
    server = None if args.address else start_server(args.models, args.threads, "", tuple(args.server_arg))
    address, pid = (args.address, args.server_pid) if server is None else (server.address, server.pid)
    try:
        check_kserve(address)
        print(f"server pid {pid or 'unknown'} at {address}")
        if not args.skip_generate:
            generation_table(args, address, pid)
        if not args.skip_classify:
            classify_table(args, address, pid)
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
