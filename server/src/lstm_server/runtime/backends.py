"""Runtimes behind one interface: numpy in, numpy out, state explicit.

``onnxruntime`` is the default (CPU, and CUDA when onnxruntime-gpu and a GPU
are present); ``torchscript`` runs ``model.pt`` with torch on CPU or CUDA and
is imported only when asked for, so a server without torch works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .model_repository import ONNX_FILE, TORCHSCRIPT_FILE, ModelEntry, ModelRepositoryError, check_onnx_session

BACKENDS = ("onnxruntime", "torchscript")
DEVICES = ("cpu", "cuda")


class Backend(Protocol):
    name: str
    device: str

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, hn, cn) for the model's named inputs."""


def onnx_session(entry: ModelEntry, path: Path, device: str, threads: int, spinning: bool = True):
    """An onnxruntime session on ``path`` (a file of ``entry``) set up for a server: ``threads`` intra-op threads,
    one inter-op thread, idle workers spinning or sleeping (see ``config.thread_spinning``), the CUDA provider on
    ``device`` cuda (refused when onnxruntime cannot use it)."""
    import onnxruntime as ort

    ort.disable_telemetry_events()  # a server does not report usage to anyone (on by default on Linux since 1.29)
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelRepositoryError(
                f"{entry.name}: device cuda asked for, but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu on a machine with a GPU, or use --device cpu)"
            )
        providers = ["CUDAExecutionProvider", *providers]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if entry.task == "classification":
        # onnxruntime plans one block for all of a call's tensors once it has seen the call's shapes, and keeps
        # it beside the arena: a second call of 4 x 4096 tokens peaked at 870 MB over the idle session rather
        # than 530 MB, and at no measurable gain in speed (the classifier's shapes change from call to call)
        options.enable_mem_pattern = False
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelRepositoryError(  # onnxruntime falls back to the CPU with only a warning
            f"{entry.name}: device cuda asked for, but onnxruntime could not use the GPU and fell back to the "
            "CPU (is a GPU visible to this process, with the CUDA and cuDNN libraries onnxruntime-gpu needs?)"
        )
    return session


def releasing_run_options(device: str):
    """Run options whose call ends by shrinking the session's memory arenas (the CPU's, and the GPU's on cuda)
    to what is in use: onnxruntime's arena grows to the largest call's tensors and keeps that memory for the
    process's life unless a call asks for ``memory.enable_memory_arena_shrinkage``."""
    import onnxruntime as ort

    options = ort.RunOptions()
    arenas = "cpu:0;gpu:0" if device == "cuda" else "cpu:0"
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
    return options


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, entry: ModelEntry, device: str, threads: int, spinning: bool = True) -> None:
        self.session = onnx_session(entry, entry.file(ONNX_FILE), device, threads, spinning)
        check_onnx_session(entry, self.session)
        self.device = device
        self._outputs = ["logits", "hn", "cn"]
        self._releasing = releasing_run_options(device)

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, h, c = self.session.run(self._outputs, inputs)
        return logits, h, c

    def run_releasing(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``run``, then the session's memory arena frees what no tensor holds: the system gets back the memory
        earlier, larger calls grew it by (which it keeps otherwise, to serve the next calls without allocating)."""
        logits, h, c = self.session.run(self._outputs, inputs, self._releasing)
        return logits, h, c


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, entry: ModelEntry, device: str, threads: int) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ModelRepositoryError(f"{entry.name}: device cuda asked for, but torch sees no GPU")
        torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self.module = torch.jit.load(str(entry.file(TORCHSCRIPT_FILE)), map_location=self._device).eval()
        self._order = [t.name for t in entry.inputs]
        self.device = device

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            args = []
            for name in self._order:
                tensor = torch.from_numpy(inputs[name])
                # lengths stay on the CPU: pack_padded_sequence wants them there
                args.append(tensor if name == "lengths" else tensor.to(self._device))
            logits, h, c = self.module(*args)
        return logits.cpu().numpy(), h.cpu().numpy(), c.cpu().numpy()


def load_backend(entry: ModelEntry, backend: str, device: str, threads: int, spinning: bool = True) -> Backend:
    """Open ``entry`` with the named runtime on ``device`` with ``threads`` intra-op threads
    (``config.threads_for``); ``spinning``: onnxruntime's idle worker threads busy-wait for the next call instead of
    sleeping."""
    if backend not in BACKENDS:
        raise ModelRepositoryError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if device not in DEVICES:
        raise ModelRepositoryError(f"unknown device {device!r}: expected one of {DEVICES}")
    if backend not in entry.manifest.get("backends", BACKENDS):
        raise ModelRepositoryError(
            f"{entry.path}: {entry.name}/{entry.version} ships only {entry.manifest['backends']}, not {backend}"
        )
    if backend == "onnxruntime":
        return OnnxBackend(entry, device, threads, spinning)
    return TorchScriptBackend(entry, device, threads)
