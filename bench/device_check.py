"""What a device does for the shipped graphs: throughput in-process, and bitwise batch invariance there.

Run it first on a machine with a GPU (``--device cuda``), then compare with ``--device cpu`` on the same machine.
For every entry under ``--models`` (each opened with the server's ``onnx_session`` on ``--device``; a device
onnxruntime cannot use is refused with the server's one-line message and exit status 2):

- throughput at each batch size of ``--batches``: the step graph (``model.onnx``) one character per row per call
  for a language model (``--steps`` tokens per row per call for a classifier, lengths all full), and the decode
  graph (``decode.onnx``) ``--steps`` characters per row per call (uniform draws from a fixed numpy generator,
  temperature 0.8, top_k 0, top_p 1, every row all steps), each call fed its last outputs; numpy in and out
  through ``session.run``, as the server calls it (host-device copies included). A measurement stops after
  ``--seconds`` (or 10,000 calls), after one warm-up call;
- the device's MatMul rate: an ONNX graph of one ``--matmul-size`` square fp32 MatMul (4096 on cuda, 1024 on
  cpu), inputs and outputs bound on the device, timed the same way; and, from the model's sizes (2 * 4 * H * (I
  + H) FLOPs per layer, direction and row per token, plus 2 * H * vocab for a language model's head), the share
  of that rate each batch reaches;
- batch invariance, bitwise (``np.array_equal``): a few rows alone (batch 1) against the same rows at random
  positions among random neighbours in batches of ``--invariance-batches``: the decode graph (sampled tokens,
  logits, h, c), its rows greedy, then sampling with seeded draws; the step graph (a prompt of 6 tokens: logits,
  h, c); a classifier's probabilities for a text alone against the same text padded among longer texts, encoded,
  padded and run by the server's own ``ClassifierEngine``.

Prints a markdown block for bench/RESULTS.md (or writes it to ``--out``); exit status 1 when an invariance check
breaks, 2 on an error.

    .venv/bin/python bench/device_check.py --models models --device cuda --out device_check_cuda.md
    .venv/bin/python bench/device_check.py --models models --device cpu --batches 1,64
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lstm_server.engine.classification import ClassifierEngine
from lstm_server.metrics import Metrics
from lstm_server.runtime.backends import OnnxBackend, onnx_session
from lstm_server.runtime.decoding import DecodeInputs
from lstm_server.runtime.model_repository import (
    DECODE_FILE,
    ONNX_FILE,
    ModelEntry,
    ModelRepositoryError,
    list_entries,
    load_entry,
)

TEMPERATURE = 0.8
MAX_CALLS = 10_000
PROMPT = 6  # tokens per row of the step graph's invariance check
SUBJECTS = 3  # rows checked alone against the same rows in a batch
DECODE_OUTPUTS = ("sampled", "logits", "hn", "cn")
STEP_OUTPUTS = ("logits", "hn", "cn")


@dataclass
class Rate:
    entry: str
    graph: str
    batch: int
    chars_per_call: int  # per row
    us_per_call: float
    flops_per_char: float

    @property
    def chars_per_s(self) -> float:
        return self.batch * self.chars_per_call / (self.us_per_call * 1e-6)


@dataclass
class Check:
    entry: str
    name: str
    batches: str
    held: bool
    detail: str = ""


def timed(call: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over a window of ``seconds`` (at least one call, at most MAX_CALLS), after a warm-up
    (two calls, or one that takes a tenth of the window)."""
    started = time.perf_counter()
    call()
    if time.perf_counter() - started < seconds / 10:
        call()
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds or calls >= MAX_CALLS:
            return elapsed / calls


def matmul_rate(device: str, size: int, seconds: float, threads: int) -> float:
    """FLOP/s of one [size, size] x [size, size] fp32 MatMul on ``device`` with onnxruntime, inputs and output
    bound on the device."""
    shape = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # IR 8: opset 17's
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    values = {
        n: ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32), device, 0) for n in "ab"
    }
    for name, value in values.items():  # ``values`` holds them (on the CPU, their numpy memory) while timed
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("y", device)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return 2 * size**3 / timed(call, seconds)


def flops_per_char(entry: ModelEntry) -> float:
    """Nominal FLOPs of one token through one row: 2 * 4 * H * (I + H) per layer and direction, plus the head."""
    config = entry.manifest.get("model_config", {})
    hidden, directions = entry.hidden_size, entry.num_directions
    width, total = config.get("embedding_dim", hidden), 0
    for _ in range(entry.num_layers):
        total += directions * 8 * hidden * (width + hidden)
        width = directions * hidden
    if entry.task == "generation":
        total += 2 * hidden * len(entry.vocab)
    return float(total)


def state(rng: np.random.Generator, entry: ModelEntry, batch: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (entry.num_layers * entry.num_directions, batch, entry.hidden_size)
    return rng.uniform(-1, 1, shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def decode_inputs(rng: np.random.Generator, entry: ModelEntry, batch: int, steps: int) -> DecodeInputs:
    """Random rows: tokens, state, draws and sampling (greedy, temperature, top_k, top_p mixed), steps 0..K."""
    h, c = state(rng, entry, batch)
    vocab = len(entry.vocab)
    return DecodeInputs(
        tokens=rng.integers(0, vocab, batch),
        h0=h,
        c0=c,
        draws=rng.random((batch, steps)),
        temperature=np.where(rng.random(batch) < 0.25, 0.0, rng.uniform(0.3, 1.5, batch)),
        top_k=np.where(rng.random(batch) < 0.5, 0, rng.integers(1, vocab + 1, batch)),
        top_p=np.where(rng.random(batch) < 0.5, 1.0, rng.uniform(0.05, 1.0, batch)),
        steps=rng.integers(0, steps + 1, batch),
    )


def run_decode(session, inputs: DecodeInputs) -> dict[str, np.ndarray]:
    feeds = {name: np.ascontiguousarray(value) for name, value in vars(inputs).items()}
    return dict(zip(DECODE_OUTPUTS, session.run(list(DECODE_OUTPUTS), feeds), strict=True))


def run_step(session, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"tokens": tokens, "h0": h, "c0": c}
    return dict(zip(STEP_OUTPUTS, session.run(list(STEP_OUTPUTS), feeds), strict=True))


def compare(alone: list[dict[str, np.ndarray]], batched: list[dict[str, np.ndarray]]) -> tuple[bool, str]:
    """Whether every subject's outputs alone equal its row in the batch, bitwise; else what differs, and by how
    much at most."""
    differ: dict[str, float] = {}
    for one, other in zip(alone, batched, strict=True):
        for name, value in one.items():
            if not np.array_equal(value, other[name]):
                diff = np.max(np.abs(value.astype(np.float64) - other[name].astype(np.float64)))
                differ[name] = max(differ.get(name, 0.0), float(diff))
    if not differ:
        return True, ""
    return False, ", ".join(f"{name} max abs diff {diff:.3g}" for name, diff in differ.items())


def row(outputs: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """Row ``r`` of outputs (state tensors are [layers, batch, hidden])."""
    return {name: value[:, r] if name in ("hn", "cn") else value[r] for name, value in outputs.items()}


def check_decode(session, entry: ModelEntry, batches: list[int], steps: int, rng: np.random.Generator) -> list[Check]:
    checks = []
    for mode in ("greedy", "seeded"):
        subjects = decode_inputs(rng, entry, SUBJECTS, steps)
        subjects.steps[:] = steps
        subjects.temperature[:] = 0.0 if mode == "greedy" else TEMPERATURE
        subjects.top_k[:], subjects.top_p[:] = 0, 1.0
        alone = [row(run_decode(session, subjects.rows(np.array([s]))), 0) for s in range(SUBJECTS)]
        held, details = True, []
        for batch in batches:
            inputs = decode_inputs(rng, entry, batch, steps)
            places = rng.choice(batch, SUBJECTS, replace=False)
            for s, place in enumerate(places):
                for name, value in vars(subjects.rows(np.array([s]))).items():
                    target = getattr(inputs, name)
                    if name in ("h0", "c0"):
                        target[:, place] = value[:, 0]
                    else:
                        target[place] = value[0]
            outputs = run_decode(session, inputs)
            ok, detail = compare(alone, [row(outputs, int(p)) for p in places])
            held &= ok
            details += [] if ok else [f"batch {batch}: {detail}"]
        checks.append(Check(entry_id(entry), f"decode, {mode}, K {steps}", sizes(batches), held, "; ".join(details)))
    return checks


def check_step(session, entry: ModelEntry, batches: list[int], rng: np.random.Generator) -> Check:
    vocab = len(entry.vocab)
    tokens = rng.integers(0, vocab, (SUBJECTS, PROMPT))
    h, c = state(rng, entry, SUBJECTS)
    alone = [row(run_step(session, tokens[s : s + 1], h[:, s : s + 1], c[:, s : s + 1]), 0) for s in range(SUBJECTS)]
    held, details = True, []
    for batch in batches:
        batch_tokens = rng.integers(0, vocab, (batch, PROMPT))
        batch_h, batch_c = state(rng, entry, batch)
        places = rng.choice(batch, SUBJECTS, replace=False)
        batch_tokens[places], batch_h[:, places], batch_c[:, places] = tokens, h, c
        outputs = run_step(session, batch_tokens, batch_h, batch_c)
        ok, detail = compare(alone, [row(outputs, int(p)) for p in places])
        held &= ok
        details += [] if ok else [f"batch {batch}: {detail}"]
    return Check(entry_id(entry), f"step, {PROMPT}-token prompt", sizes(batches), held, "; ".join(details))


def check_classifier(backend: OnnxBackend, entry: ModelEntry, batches: list[int], rng: np.random.Generator) -> Check:
    """A text's probabilities alone against the same text among longer ones, through the server's engine."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(entry.tokenizer_json())
    layers = entry.num_layers * entry.num_directions
    engine = ClassifierEngine(
        entry.name,
        backend,
        tokenizer,
        entry.labels,
        (layers, entry.hidden_size),
        entry.manifest.get("pad_id", 0),
        max(batches),
        0.0,
        Metrics(),
    )
    try:
        words = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
        texts = ["a gorgeous film", "dull and lifeless", "it is not the worst movie of the year , but close"]
        subjects = [engine.encode(text) for text in texts]
        alone = [{"probabilities": engine.classify_encoded([ids])[0]} for ids in subjects]
        longest = max(map(len, subjects))
        held, details = True, []
        for batch in batches:
            neighbours = [
                " ".join(rng.choice(words, int(rng.integers(longest + 1, longest + 25)))) for _ in range(batch)
            ]
            encoded = [engine.encode(text) for text in neighbours]
            places = rng.choice(batch, len(subjects), replace=False)
            for ids, place in zip(subjects, places, strict=True):
                encoded[place] = ids
            results = engine.classify_encoded(encoded)
            ok, detail = compare(alone, [{"probabilities": results[int(p)]} for p in places])
            held &= ok
            details += [] if ok else [f"batch {batch}: {detail}"]
    finally:
        asyncio.run(engine.stop())  # its model thread
    return Check(entry_id(entry), "classify, padded among longer texts", sizes(batches), held, "; ".join(details))


def throughput(
    entry: ModelEntry, step, decode, batches: list[int], steps: int, seconds: float, rng: np.random.Generator
) -> list[Rate]:
    """Per batch size: the step graph, and the decode graph when the entry has one."""
    rates = []
    flops = flops_per_char(entry)
    for batch in batches:
        h, c = state(rng, entry, batch)
        if entry.task == "classification":
            feeds = {
                "tokens": rng.integers(1, entry.manifest["vocab_size"], (batch, steps)),
                "lengths": np.full(batch, steps, np.int64),
                "h0": np.zeros_like(h),
                "c0": np.zeros_like(c),
            }
            seconds_per_call = timed(lambda feeds=feeds: step.run(["logits"], feeds), seconds)
            rates.append(Rate(entry_id(entry), "model.onnx (classify)", batch, steps, seconds_per_call * 1e6, flops))
            continue
        carried = {"tokens": rng.integers(0, len(entry.vocab), (batch, 1)), "h0": h, "c0": c}

        def one_step(carried: dict = carried) -> None:
            logits, carried["h0"], carried["c0"] = step.run(list(STEP_OUTPUTS), carried)
            carried["tokens"] = logits[:, -1].argmax(axis=1)[:, None]

        rates.append(Rate(entry_id(entry), "model.onnx (step)", batch, 1, timed(one_step, seconds) * 1e6, flops))
        if decode is None:
            continue
        inputs = DecodeInputs(
            tokens=rng.integers(0, len(entry.vocab), batch),
            h0=h,
            c0=c,
            draws=rng.random((batch, steps)),
            temperature=np.full(batch, TEMPERATURE),
            top_k=np.zeros(batch, np.int64),
            top_p=np.ones(batch),
            steps=np.full(batch, steps, np.int64),
        )

        def one_decode(inputs: DecodeInputs = inputs, batch: int = batch) -> None:
            out = run_decode(decode, inputs)
            inputs.tokens, inputs.h0, inputs.c0 = out["sampled"][:, -1], out["hn"], out["cn"]
            inputs.draws = rng.random((batch, steps))

        rates.append(Rate(entry_id(entry), "decode.onnx", batch, steps, timed(one_decode, seconds) * 1e6, flops))
    return rates


def entry_id(entry: ModelEntry) -> str:
    return f"{entry.name}/{entry.version}"


def sizes(batches: list[int]) -> str:
    return ", ".join(map(str, batches))


def machine(device: str, threads: int) -> list[str]:
    """Lines describing the machine: onnxruntime, its providers, the GPU (cuda), the CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; providers {', '.join(ort.get_available_providers())}",
        f"CPU: {cpu}, {os.cpu_count()} logical CPUs; {threads} intra-op threads per session",
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    if device == "cuda":
        try:
            found = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = "unknown (nvidia-smi not available)"
        lines.insert(0, f"GPU: {found}")
    return lines


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(args: argparse.Namespace, matmul: float, rates: list[Rate], checks: list[Check]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["bench/device_check.py", *sys.argv[1:]])
    broken = [c for c in checks if not c.held]
    lines = [
        f"### device_check.py on {args.device} ({now})",
        "",
        f"Command: `.venv/bin/python {command}`; commit {commit()}.",
        "",
        *(f"- {line}" for line in machine(args.device, args.threads)),
        f"- MatMul {args.matmul_size}x{args.matmul_size} fp32 on {args.device}: {matmul / 1e9:,.1f} GFLOP/s",
        "",
        "| entry | graph | batch | chars per row per call | µs per call | chars/s | model GFLOP/s | % of MatMul |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rates:
        achieved = r.chars_per_s * r.flops_per_char
        lines.append(
            f"| {r.entry} | {r.graph} | {r.batch} | {r.chars_per_call} | {r.us_per_call:,.1f} | "
            f"{r.chars_per_s:,.0f} | {achieved / 1e9:,.2f} | {100 * achieved / matmul:.2f} |"
        )
    lines += ["", "| entry | invariance check | batch sizes | result |", "|---|---|---|---|"]
    lines += [f"| {c.entry} | {c.name} | {c.batches} | {'held' if c.held else f'broken: {c.detail}'} |" for c in checks]
    verdict = f"{len(broken)} of {len(checks)} broken" if broken else f"all {len(checks)} held"
    lines += ["", f"Batch invariance on {args.device}, bitwise, {SUBJECTS} rows alone vs in a batch: {verdict}."]
    return "\n".join(lines) + "\n"


def batch_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository (default models)")
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--batches", type=batch_list, default=[1, 64, 256, 1024], help="throughput batch sizes")
    parser.add_argument("--invariance-batches", type=batch_list, default=[64, 256], help="batches beside the rows")
    parser.add_argument("--steps", type=int, default=32, help="decode K (classifier: tokens per call); default 32")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    parser.add_argument("--matmul-size", type=int, help="square MatMul size (default 4096 on cuda, 1024 on cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads per session")
    parser.add_argument("--entries", nargs="*", help="only these NAME/VERSION entries (default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown block here instead of stdout")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.matmul_size is None:
        args.matmul_size = 4096 if args.device == "cuda" else 1024
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        names = [f"{name}/{v}" for name, versions in list_entries(args.models).items() for v in versions]
        names = [n for n in names if not args.entries or n in args.entries]
        if not names:
            raise ModelRepositoryError(f"{args.models}: no model entries (or none of {args.entries})")
        opened = []  # every session first, so a refused device stops the run at once
        for name in names:
            entry = load_entry(args.models / name)
            step = OnnxBackend(entry, args.device, args.threads)  # onnx_session on model.onnx, signature checked
            decode = None
            if entry.task == "generation" and entry.has_decode_graph:
                decode = onnx_session(entry, entry.file(DECODE_FILE), args.device, args.threads)
            opened.append((entry, step, decode))
    except ModelRepositoryError as error:
        print(f"device_check.py: error: {error}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(20260101)
    matmul = matmul_rate(args.device, args.matmul_size, args.seconds, args.threads)
    rates: list[Rate] = []
    checks: list[Check] = []
    for entry, step, decode in opened:
        print(f"{entry_id(entry)}: {ONNX_FILE}{' and ' + DECODE_FILE if decode else ''} ...", file=sys.stderr)
        rates += throughput(entry, step.session, decode, args.batches, args.steps, args.seconds, rng)
        if entry.task == "classification":
            checks.append(check_classifier(step, entry, args.invariance_batches, rng))
            continue
        checks.append(check_step(step.session, entry, args.invariance_batches, rng))
        if decode is not None:
            checks += check_decode(decode, entry, args.invariance_batches, args.steps, rng)
    text = report(args, matmul, rates, checks)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 1 if any(not c.held for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
