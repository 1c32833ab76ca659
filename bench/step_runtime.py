"""Per-step latency and tokens/s of the language model in onnxruntime, TorchScript and eager PyTorch.

One step = one token for every row of the batch, (h, c) carried: the work of one
generation step in the server. The three runtimes are timed interleaved in one
run, at the same batch and thread count, so machine noise hits them alike.

The floor (DESIGN.md section 6): floating-point operations per token
(8 x hidden x (input + hidden) per layer, plus 2 x hidden x vocab for the
projection) over the machine's matrix-multiply rate, measured in the same run
both at its best (a large square sgemm) and at this step's own shape
([batch, input + hidden] x [input + hidden, 4 x hidden]).

    .venv/bin/python bench/step_runtime.py [--model models/charlm/1] [--batches 1 8 64 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstm_server.runtime.model_repository import load_entry
from lstm_training.models import CharLM, CharLMConfig


def flops_per_token(manifest: dict) -> int:
    """Multiply-adds x 2 of one token through every LSTM layer and the projection."""
    config = manifest["model_config"]
    hidden, total, width = config["hidden_size"], 0, config["embedding_dim"]
    for _ in range(config["num_layers"]):
        total += 8 * hidden * (width + hidden)
        width = hidden
    return total + 2 * hidden * config["vocab_size"]


def gemm_rate(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """Sustained FLOP/s of torch.mm for [m, k] x [k, n]: the best of three timed windows after a warm-up."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            torch.mm(a, b)
            runs += 1
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - started))
    return best


def runners(entry_path: Path, threads: int):
    entry = load_entry(entry_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(entry.file("model.onnx")), options, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(entry.file("model.pt"))).eval()
    eager = CharLM(CharLMConfig(**entry.manifest["model_config"]))
    eager.load_state_dict(scripted.state_dict())
    eager.eval()

    def run_onnx(tokens, h, c):
        _, h, c = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
        return h, c

    def torch_runner(module, onednn: bool = True):
        def run(tokens, h, c):
            with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn):
                _, h, c = module(torch.from_numpy(tokens), torch.from_numpy(h), torch.from_numpy(c))
            return h.numpy(), c.numpy()

        return run

    return entry, {
        "onnxruntime": run_onnx,
        "torchscript": torch_runner(scripted),
        "eager": torch_runner(eager),
        "eager, oneDNN off": torch_runner(eager, onednn=False),
    }


def time_steps(runs: dict, entry, batch: int, steps: int) -> dict[str, float]:
    """Median seconds per step for each runtime, interleaved in blocks of 10 steps."""
    layers = entry.num_layers * entry.num_directions
    rng = np.random.default_rng(0)
    state = {name: (np.zeros((layers, batch, entry.hidden_size), np.float32),) * 2 for name in runs}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        for _ in range(3):
            state[name] = run(rng.integers(0, len(entry.vocab), (batch, 1)), *state[name])
    for _ in range(max(1, steps // 10)):
        for name, run in runs.items():
            tokens = rng.integers(0, len(entry.vocab), (batch, 1))
            started = time.perf_counter()
            for _ in range(10):
                state[name] = run(tokens, *state[name])
            samples[name].append((time.perf_counter() - started) / 10)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/charlm/1"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="TF32 acceleration")
    torch.set_num_threads(args.threads)
    entry, runs = runners(args.model, args.threads)
    flops = flops_per_token(entry.manifest)
    width = entry.manifest["model_config"]["hidden_size"]
    peak = max(gemm_rate(n, n, n) for n in (1024, 2048))
    print(f"model {args.model}: {entry.num_layers} layers x {width} hidden, {flops / 1e6:.2f} MFLOP per token")
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    print(f"peak sgemm (best of 1024^3 and 2048^3): {peak / 1e9:.1f} GFLOP/s\n")
    print(
        "| batch | runtime | ms/step | tokens/s | vs eager | floor tokens/s: step-shape sgemm "
        "| floor tokens/s: peak sgemm | % of peak floor |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    floor_peak = peak / flops
    for batch in args.batches:
        floor_shape = gemm_rate(batch, 2 * width, 4 * width) / flops
        seconds = time_steps(runs, entry, batch, args.steps)
        for name, value in seconds.items():
            rate = batch / value
            print(
                f"| {batch} | {name} | {value * 1e3:.3f} | {rate:,.0f} | {seconds['eager'] / value:.1f}x | "
                f"{floor_shape:,.0f} | {floor_peak:,.0f} | {100 * rate / floor_peak:.0f}% |"
            )


if __name__ == "__main__":
    main()
