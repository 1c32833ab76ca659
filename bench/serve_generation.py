"""Served generation against the runtime alone and against the naive approach, side by side in one run.

For each concurrency N (default 1, 16, 64, 256):

- served: N sessions stream ``--tokens`` characters each from an lstm-server
  process (started here, on the model repository given); aggregate characters
  per second, time to first token, inter-token latency p50 / p99 (a chunk of k
  characters arriving t seconds after the previous one counts k gaps of t / k);
- in-process: onnxruntime stepping the same model at batch N with the state
  carried, no server (the ceiling for the served path);
- naive: N threads, each an eager PyTorch generate loop at batch 1 (the usual
  hand-written ``for`` loop with ``torch.multinomial``).

Then time to first token for a 1000-character prompt, served, against the
in-process prefill of the same prompt (one onnxruntime call).

    .venv/bin/python bench/serve_generation.py [--models models] [--concurrency 1 16 64 256]
"""

from __future__ import annotations

import argparse
import asyncio
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
from lstm_server.runtime.model_repository import load_entry
from lstm_training.models import CharLM, CharLMConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
import cluster

PROMPT = "ROMEO:\n"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def start_server(models: Path, threads: int, versions: str = "", extra: tuple[str, ...] = ()) -> cluster.Process:
    """An lstm-server process on a free loopback port, serving (its log in a temporary folder); ``extra``
    options are passed on."""
    port = cluster.free_port()
    command = [str(Path(sys.executable).parent / "lstm-server"), "--models", str(models), "--port", str(port)]
    command += ["--metrics-port", "0", "--threads", str(threads), "--log-level", "WARNING", "--drain-delay-s", "0"]
    command += ["--model-versions", versions, *extra]
    server = cluster.spawn("bench-server", command, port, Path(tempfile.mkdtemp(prefix="bench-server-")))
    cluster.wait_until_serving(server)
    return server


async def served(
    address: str, concurrency: int, tokens: int, turn_prompt: str = "", **client_settings
) -> dict[str, float]:
    """N sessions stream ``tokens`` characters each at once; ``client_settings`` go to the AsyncClient."""
    ttft: list[float] = []
    gaps: list[float] = []
    async with AsyncClient(address, timeout=600, **client_settings) as client:
        sessions = [await client.session(model="charlm", prompt=PROMPT).open() for _ in range(concurrency)]

        async def one(session, seed: int) -> int:
            started = last = time.perf_counter()
            count = 0
            async for chunk in session.generate(turn_prompt, max_tokens=tokens, temperature=0.8, seed=seed):
                now = time.perf_counter()
                if not chunk.text:
                    continue
                if count == 0:
                    ttft.append(now - started)
                else:
                    gaps.extend([(now - last) / len(chunk.text)] * len(chunk.text))
                count += len(chunk.text)
                last = now
            return count

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(s, i) for i, s in enumerate(sessions)))
        elapsed = time.perf_counter() - started
        for session in sessions:
            await session.close()
    return {
        "chars_per_s": sum(counts) / elapsed,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
    }


def in_process(session: ort.InferenceSession, layers: int, hidden: int, batch: int, steps: int) -> float:
    """Characters per second of onnxruntime stepping ``batch`` rows with the state carried."""
    h = np.zeros((layers, batch, hidden), np.float32)
    c = np.zeros_like(h)
    tokens = np.zeros((batch, 1), np.int64)
    for _ in range(3):
        _, h, c = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
    started = time.perf_counter()
    for _ in range(steps):
        logits, h, c = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
        tokens = logits[:, -1].argmax(axis=1)[:, None]
    return batch * steps / (time.perf_counter() - started)


def naive(model: CharLM, index: dict[str, int], concurrency: int, tokens: int) -> float:
    """Characters per second of ``concurrency`` threads, each an eager generate loop at batch 1."""

    def generate(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            h, c = model.initial_state(1)
            logits, h, c = model(torch.tensor([[index[ch] for ch in PROMPT]]), h, c)
            for _ in range(tokens):
                probs = torch.softmax(logits[0, -1] / 0.8, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
                logits, h, c = model(token.view(1, 1), h, c)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return concurrency * tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=200, help="characters per served session")
    parser.add_argument("--naive-tokens", type=int, default=40, help="characters per naive request")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--version", type=int, default=1, help="the charlm version served and stepped in-process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = load_entry(args.models / "charlm" / str(args.version))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(entry.file("model.onnx")), options, providers=["CPUExecutionProvider"])
    eager = CharLM(CharLMConfig(**entry.manifest["model_config"]))
    fp32 = load_entry(args.models / "charlm" / "1")  # the naive loop runs the fp32 weights in eager PyTorch
    eager.load_state_dict(torch.jit.load(str(fp32.file("model.pt"))).state_dict())
    eager.eval()
    index = {ch: i for i, ch in enumerate(entry.vocab)}
    layers, hidden = entry.num_layers, entry.hidden_size
    print(
        f"model {entry.path} ({layers} x {hidden}); {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} threads; {args.tokens} chars per session\n"
    )
    server = start_server(args.models, args.threads, f"charlm={args.version}")
    address = server.address
    try:
        print(
            "| sessions | served chars/s | in-process chars/s | naive chars/s | served / in-process | served / naive "
            "| TTFT p50 / p99 ms | ITL p50 / p99 ms |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.concurrency:
            result = asyncio.run(served(address, n, args.tokens))
            ceiling = in_process(session, layers, hidden, n, steps=max(20, 2000 // n))
            baseline = naive(eager, index, n, args.naive_tokens)
            print(
                f"| {n} | {result['chars_per_s']:,.0f} | {ceiling:,.0f} | {baseline:,.0f} | "
                f"{result['chars_per_s'] / ceiling:.0%} | {result['chars_per_s'] / baseline:.1f}x | "
                f"{1e3 * result['ttft_p50']:.1f} / {1e3 * result['ttft_p99']:.1f} | "
                f"{1e3 * result['itl_p50']:.2f} / {1e3 * result['itl_p99']:.2f} |"
            )
        long_prompt = ("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)[:1000]
        ttft = [asyncio.run(served(address, 1, 1, turn_prompt=long_prompt))["ttft_p50"] for _ in range(5)]
        prefill = []
        ids = np.array([[index[ch] for ch in long_prompt]], np.int64)
        zeros = np.zeros((layers, 1, hidden), np.float32)
        for _ in range(5):
            started = time.perf_counter()
            session.run(None, {"tokens": ids, "h0": zeros, "c0": zeros})
            prefill.append(time.perf_counter() - started)
        served_ttft = statistics.median(ttft)
        print(
            f"\nTTFT, 1000-character prompt: served {1e3 * served_ttft:.1f} ms (median of 5: the Generate call to "
            f"its first "
            f"character), in-process prefill {1e3 * statistics.median(prefill):.1f} ms, "
            f"ratio {served_ttft / statistics.median(prefill):.2f}x"
        )
    finally:
        cluster.stop(server)


if __name__ == "__main__":
    main()
