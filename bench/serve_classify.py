"""Served classification (dynamic batching across clients) against batched in-process onnxruntime.

``--clients`` concurrent clients (default 64) each call Classify with one
sentence at a time for ``--seconds``; reported: sentences per second and
p50 / p99 latency. In the same run, onnxruntime classifies the same sentences
in-process in batches of ``classify_max_batch`` (64), sorted by length, as the
server's batcher does: the ceiling.

    .venv/bin/python bench/serve_classify.py --sentences path/to/sst2/dev.tsv [--models models]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from serve_generation import cluster, percentile, start_server
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


def in_process(models: Path, version: int, sentences: list[str], batch: int, threads: int) -> float:
    entry = load_entry(models / "sentiment" / str(version))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(entry.file("model.onnx")), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_str(entry.tokenizer_json())
    layers = entry.num_layers * entry.num_directions
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
    return len(sentences) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--sentences", type=Path, required=True, help="an SST-2 TSV file: its sentences are sent")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--version", type=int, default=1, help="the sentiment version served and run in-process")
    args = parser.parse_args()
    sentences = load_sentences(args.sentences)
    ceiling = in_process(args.models, args.version, sentences, 64, args.threads)
    server = start_server(args.models, args.threads, f"sentiment={args.version}")
    try:
        rate, latencies = asyncio.run(served(server.address, sentences, args.clients, args.seconds))
    finally:
        cluster.stop(server)
    print(
        f"{len(sentences)} sentences ({args.sentences if args.sentences.is_file() else 'built-in'}), "
        f"{args.clients} clients, {args.threads} threads, sentiment version {args.version}\n"
    )
    print("| path | sentences/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(
        f"| served, {args.clients} clients x 1 sentence | {rate:,.0f} | {1e3 * percentile(latencies, 50):.1f} | "
        f"{1e3 * percentile(latencies, 99):.1f} |"
    )
    print(f"| in-process onnxruntime, batches of 64 | {ceiling:,.0f} | | |")
    print(f"\nserved / in-process: {rate / ceiling:.0%}")


if __name__ == "__main__":
    main()
