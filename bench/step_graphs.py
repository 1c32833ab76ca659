"""The ONNX graphs side by side: the previous export (fused ``LSTM`` operator, fp32 and ``quantize_dynamic`` int8)
against the batch-invariant step graphs (``lstm_export.step_graph``, fp32 and per-row int8).

Every graph is built here from the same checkpoint, in a temporary directory. For each model and batch size the
graphs are timed interleaved (round after round, each graph in turn, so machine noise hits them alike); a sample is
the mean of several calls, and the table gives the best and the median sample. Workloads: the language model's
one-token step (the hot path of serving) and a 256-token read of 16 streams (how its quality is measured); the
classifier's one-token call and a padded batch of texts of 4 to 40 tokens. ``--invariance`` also runs the batch
invariance checker on every graph (and on TorchScript).

    .venv/bin/python bench/step_graphs.py [--checkpoints models/checkpoints] [--batches 1 64 256] [--invariance]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from lstm_export.exporter import export_onnx, input_names
from lstm_export.invariance import ModelShape, check_batch_invariance
from lstm_export.step_graph import export_step_onnx
from lstm_export.verify import onnx_runner, torch_runner
from lstm_training.checkpoint import load_checkpoint, model_from_checkpoint

KINDS = {"charlm": "generation", "sentiment": "classification"}
GRAPHS = ("fused fp32", "fused int8 (dynamic)", "step fp32", "step int8 (per row)")


def build_graphs(model: torch.nn.Module, task: str, folder: Path) -> dict[str, Path]:
    paths = dict(zip(GRAPHS, (folder / f"{n}.onnx" for n in ("fused", "dynamic", "step", "step_int8")), strict=True))
    export_onnx(model, task, paths["fused fp32"])
    quantize_dynamic(str(paths["fused fp32"]), str(paths["fused int8 (dynamic)"]), weight_type=QuantType.QInt8)
    export_step_onnx(model, task, paths["step fp32"])
    export_step_onnx(model, task, paths["step int8 (per row)"], quantize=True)
    return paths


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(model: torch.nn.Module, task: str, batch: int, time_steps: int, rng: np.random.Generator) -> dict:
    h0 = np.zeros((model.initial_state(1)[0].shape[0], batch, model.config.hidden_size), np.float32)
    tokens = rng.integers(1, model.config.vocab_size, (batch, time_steps))
    if task == "generation":
        return dict(zip(input_names(task), (tokens, h0, h0), strict=True))
    lengths = rng.integers(min(4, time_steps), time_steps + 1, batch)
    lengths[0] = time_steps
    tokens[np.arange(time_steps)[None, :] >= lengths[:, None]] = model.config.pad_id
    return dict(zip(input_names(task), (tokens, lengths, h0, h0), strict=True))


def time_graphs(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per call of each session, interleaved; a sample is the mean of enough calls."""
    started = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    calls = max(1, int(0.004 / ((time.perf_counter() - started) / len(sessions))))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            started = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds)
            samples[name].append((time.perf_counter() - started) / calls)
    return {name: (min(v), float(np.median(v))) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--invariance", action="store_true", help="also run the batch invariance checker")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = f"onnxruntime {ort.__version__}, torch {torch.__version__}"
    print(f"machine: {platform.machine()}, {args.threads} threads, {versions}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            task = KINDS[kind]
            model = model_from_checkpoint(load_checkpoint(args.checkpoints / kind / "best.pt"))
            paths = build_graphs(model, task, Path(tmp))
            sessions = {name: session(path, args.threads) for name, path in paths.items()}
            sizes = ", ".join(f"{name} {path.stat().st_size / 1e6:.1f} MB" for name, path in paths.items())
            print(f"\n## {kind}: {sizes}\n")
            print("| workload | batch | " + " | ".join(f"{name}: ms best / median" for name in GRAPHS) + " |")
            print("|---|---:|" + "---:|" * len(GRAPHS))
            workloads = [("one-token call", b, 1) for b in args.batches]
            if task == "generation":
                workloads.append(("256 tokens", 16, 256))
            else:
                workloads += [("texts of 4-40 tokens", b, 40) for b in args.batches]
            for label, batch, steps in workloads:
                timed = time_graphs(sessions, feeds_for(model, task, batch, steps, rng), args.rounds)
                cells = " | ".join(f"{best * 1e3:.3f} / {median * 1e3:.3f}" for best, median in timed.values())
                print(f"| {label} | {batch} | {cells} |", flush=True)
            if args.invariance:
                shape = ModelShape.from_manifest(
                    {
                        "task": task,
                        "vocab_size": model.config.vocab_size,
                        "num_layers": model.config.num_layers,
                        "num_directions": 2 if getattr(model.config, "bidirectional", False) else 1,
                        "hidden_size": model.config.hidden_size,
                        "pad_id": getattr(model.config, "pad_id", 0),
                    }
                )
                runners = {name: onnx_runner(s, task) for name, s in sessions.items()}
                runners["TorchScript (torch.jit.script)"] = torch_runner(torch.jit.script(model))
                print()
                for name, run in runners.items():
                    result = check_batch_invariance(run, shape)
                    print(f"- {kind}, {name}: invariant {result.invariant}; first failure: {result.first_failure}")


if __name__ == "__main__":
    main()
