"""Both runtimes behind one interface; GPU paths run only where a GPU is present."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client
from lstm_server.runtime.backends import load_backend
from lstm_server.runtime.model_repository import ModelRepositoryError, load_entry

from ..serving import ServerThread, Stubs, array_of

PROMPT = "KING:\nthe "
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available()


def test_a_backend_not_proven_batch_invariant_is_batched_only_when_the_operator_opts_in(exported) -> None:
    with pytest.raises(ModelRepositoryError, match="charlm/1 on torchscript is not batch-invariant") as refused:
        ServerThread(exported, backend="torchscript")
    assert "--allow-batch-variance" in str(refused.value) and "--max-batch 1" in str(refused.value)
    unbatched = ServerThread(exported, backend="torchscript", max_batch=1, classify_max_batch=1)
    unbatched.stop()


def test_torchscript_backend_serves_the_same_model(start_server, reference) -> None:
    running = start_server(backend="torchscript", allow_batch_variance=True)
    stubs = Stubs(running.address)
    info = stubs.models.DescribeModel(pb.DescribeModelRequest(model="charlm"))
    assert info.backend == "torchscript" and info.device == "cpu"
    step = stubs.generation.Step(pb.StepRequest(model="charlm", text=PROMPT))
    logits, h, _ = reference.feed(PROMPT)
    expected = np.exp(logits - logits.max())
    np.testing.assert_allclose(step.probabilities, expected / expected.sum(), atol=1e-5)
    np.testing.assert_allclose(array_of(step.h).ravel(), h.ravel(), atol=1e-5)
    with Client(running.address) as client, client.session(model="charlm", prompt=PROMPT) as session:
        text = "".join(c.text for c in session.generate(max_tokens=20, temperature=0))
    assert text == reference.generate(PROMPT, 20, temperature=0)[0]
    result = client_classify(running.address)
    assert set(result.probabilities) == {"negative", "positive"}
    stubs.channel.close()


def client_classify(address: str):
    with Client(address) as client:
        return client.classify(["a gorgeous film"])[0]


def test_per_model_backend_choice(start_server) -> None:
    running = start_server(model_backends="sentiment=torchscript", allow_batch_variance=True)
    stubs = Stubs(running.address)
    backends = {m.name: m.backend for m in stubs.models.ListModels(pb.ListModelsRequest()).models}
    assert backends == {"charlm": "onnxruntime", "sentiment": "torchscript"}
    stubs.channel.close()


@pytest.mark.parametrize("spinning", [True, False])
def test_thread_spinning_is_the_operators_choice_and_changes_no_result(exported, spinning) -> None:
    entry = load_entry(exported / "charlm" / "1")
    backend = load_backend(entry, "onnxruntime", "cpu", threads=2, spinning=spinning)
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    baseline = load_backend(entry, "onnxruntime", "cpu", threads=2)
    h = np.zeros((entry.num_layers, 3, entry.hidden_size), np.float32)
    feeds = {"tokens": np.array([[1, 2], [3, 4], [5, 6]], np.int64), "h0": h, "c0": h}
    for got, expected in zip(backend.run(feeds), baseline.run(feeds), strict=True):
        assert np.array_equal(got, expected)


def test_backend_errors_are_clear(exported) -> None:
    entry = load_entry(exported / "charlm" / "1")
    with pytest.raises(ModelRepositoryError, match="unknown backend 'tensorflow'"):
        load_backend(entry, "tensorflow", "cpu", 1)
    with pytest.raises(ModelRepositoryError, match="unknown device 'tpu'"):
        load_backend(entry, "onnxruntime", "tpu", 1)
    quantized = dict(entry.manifest, backends=["onnxruntime"])
    with pytest.raises(ModelRepositoryError, match=r"ships only \['onnxruntime'\], not torchscript"):
        load_backend(type(entry)(entry.path, quantized), "torchscript", "cpu", 1)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_with_a_reason(exported) -> None:
    entry = load_entry(exported / "charlm" / "1")
    with pytest.raises(ModelRepositoryError, match="no CUDA provider"):
        load_backend(entry, "onnxruntime", "cuda", 1)
    with pytest.raises(ModelRepositoryError, match="torch sees no GPU"):
        load_backend(entry, "torchscript", "cuda", 1)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU (CUDA)")
@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_cuda_backend_matches_the_cpu_reference(start_server, reference, backend) -> None:
    if backend == "onnxruntime" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    if backend == "torchscript" and not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    running = start_server(backend=backend, device="cuda")
    stubs = Stubs(running.address)
    assert stubs.models.DescribeModel(pb.DescribeModelRequest(model="charlm")).device == "cuda"
    step = stubs.generation.Step(pb.StepRequest(model="charlm", text=PROMPT))
    _, h, _ = reference.feed(PROMPT)
    np.testing.assert_allclose(array_of(step.h).ravel(), h.ravel(), atol=1e-4)
    stubs.channel.close()


def test_highest_version_unless_pinned(repository) -> None:
    import json
    import shutil

    from ..serving import ServerThread

    shutil.copytree(repository / "charlm" / "1", repository / "charlm" / "2")
    manifest = json.loads((repository / "charlm" / "2" / "manifest.json").read_text())
    (repository / "charlm" / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    for pin, expected in (("", 2), ("charlm=1", 1)):
        running = ServerThread(repository, model_versions=pin)
        stubs = Stubs(running.address)
        assert stubs.models.DescribeModel(pb.DescribeModelRequest(model="charlm")).version == expected
        stubs.channel.close()
        running.stop()
