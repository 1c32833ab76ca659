"""Real servers, certificates (deploy/certs.py), token files and fake servers for the client's tests.

The real servers are ``lstm-server`` processes on the shipped models/ (started with deploy/cluster.py's ``spawn``),
and the in-process reference runs in another process too (tests/reference.py): nothing here loads torch or
onnxruntime, which test_light_imports.py checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import certs
import cluster
import grpc
import numpy as np
import pytest
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_client import Client, LstmError, TlsConfig

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
LIGHT_IMPORTS_TEST = "test_light_imports.py::test_the_client_tests_load_neither_torch_nor_onnxruntime"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The check of the modules loaded runs after every other test (a stable sort keeps the rest in order)."""
    items.sort(key=lambda item: item.nodeid.endswith(LIGHT_IMPORTS_TEST))


# -- lstm-server in a subprocess, and the reference in another -------------------------------------------------


def lstm_server_command() -> str:
    """The ``lstm-server`` script beside this Python (the project's virtualenv), else the one on PATH."""
    beside = Path(sys.executable).with_name("lstm-server")
    found = str(beside) if beside.exists() else shutil.which("lstm-server")
    assert found, "lstm-server is not installed (make install)"
    return found


def answers(address: str, **settings) -> bool:
    try:
        with Client(address, retries=0, timeout=2, **settings) as client:
            client.models()
        return True
    except LstmError:
        return False


def serve(workdir: Path, *options: str, **client_settings) -> cluster.Process:
    """``lstm-server`` on models/ in a subprocess, like a test server in-process was: loopback, a free port, no
    metrics port, one thread, replica ``test-replica``, no drain delay, then ``options``. Returns once a client
    with ``client_settings`` (TLS, a token) lists the models."""
    port = cluster.free_port()
    command = [lstm_server_command(), "--models", str(MODELS), "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--threads",
        "1",
        "--replica-name",
        "test-replica",
        "--drain-delay-s",
        "0",
    ]
    process = cluster.spawn("lstm-server", [*command, *options], port, workdir)

    def ready() -> bool:
        if not cluster.alive(process.pid):
            raise cluster.ClusterError(f"lstm-server exited:\n{Path(process.log).read_text()[-4000:]}")
        return answers(process.address, **client_settings)

    try:
        cluster.wait_for(ready, "lstm-server", 60, Path(process.log))
    except BaseException:
        cluster.stop(process)
        raise
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server (plaintext on loopback, no authentication): ``server.address``."""
    running = serve(tmp_path_factory.mktemp("server"))
    yield running
    cluster.stop(running)


class SubprocessReference:
    """``feed(text)``: (logits, h, c) after a fresh session reads ``text``, from the entry stepped with onnxruntime
    by ``python -m tests.reference`` (tests/reference.py) in another process."""

    def __init__(self, entry_dir: Path, workdir: Path) -> None:
        self.entry_dir, self.workdir, self.calls = entry_dir, workdir, 0

    def feed(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls += 1
        out = self.workdir / f"feed-{self.calls}.npz"
        command = [sys.executable, "-m", "tests.reference", str(self.entry_dir), text, str(out)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-4000:]
        with np.load(out) as arrays:
            return arrays["logits"], arrays["h"], arrays["c"]


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> SubprocessReference:
    """The reference for the language model ``server`` serves (its highest version under models/)."""
    with Client(server.address) as client:
        version = next(m.version for m in client.models() if m.name == "charlm")
    return SubprocessReference(MODELS / "charlm" / str(version), tmp_path_factory.mktemp("reference"))


# -- certificates, tokens, secured servers ----------------------------------------------------------------------

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}


@dataclass(frozen=True)
class Pki:
    """A CA with a server certificate (loopback names), client certificates for alice and bob, a server
    certificate that names only ``lstm.internal``, and a second CA that signed nothing here."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]
    internal_cert: Path
    internal_key: Path
    other_ca: Path
    stranger: tuple[Path, Path]  # a client certificate (CN alice) from the other CA


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    made = certs.write_dev_certs(root / "dev", clients=["alice", "bob"])
    ca = certs.load(made.ca, made.ca_key)
    certs.make_server_cert(ca, ["lstm.internal"], loopback=False).write(
        root / "internal.pem", root / "internal-key.pem"
    )
    other = certs.write_dev_certs(root / "other", clients=["alice"])
    return Pki(
        made.ca,
        made.server_cert,
        made.server_key,
        made.clients,
        root / "internal.pem",
        root / "internal-key.pem",
        other.ca,
        other.clients["alice"],
    )


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text("# TENANT TOKEN\n" + "".join(f"{tenant} {token}\n" for tenant, token in tokens.items()))
    return path


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """A real server: TLS, bearer tokens for alice and bob."""
    workdir = tmp_path_factory.mktemp("tls-server")
    tokens = write_tokens(workdir / "tokens", TOKENS)
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    running = serve(workdir, *tls, "--auth-tokens", str(tokens), tls=TlsConfig(ca=pki.ca), token=TOKENS["alice"])
    yield running
    cluster.stop(running)


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    """A real server that requires client certificates signed by the CA (the tenant is the certificate's CN)."""
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    cert, key = pki.clients["alice"]
    running = serve(tmp_path_factory.mktemp("mtls-server"), *tls, tls=TlsConfig(ca=pki.ca, cert=cert, key=key))
    yield running
    cluster.stop(running)


class Recorder(rpc.ClassificationServicer, rpc.SessionsServicer, rpc.GenerationServicer, rpc.ModelsServicer):
    """A fake server that records each call's ``authorization`` metadata and the client certificate's CN, and
    serves ``ListSessions`` from ``sessions`` in pages (``repeat_token``: a broken server that loops)."""

    def __init__(self, sessions: int = 0, repeat_token: bool = False) -> None:
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.sessions = [pb.Session(session_id=f"{i:032x}", model="charlm") for i in range(sessions)]
        self.page_requests: list[pb.ListSessionsRequest] = []
        self.repeat_token = repeat_token

    def _record(self, method: str, context) -> None:
        metadata = dict(context.invocation_metadata())
        names = (context.auth_context() or {}).get("x509_common_name") or [None]
        name = names[0].decode() if isinstance(names[0], bytes) else names[0]
        self.calls.append((method, metadata.get("authorization"), name))

    def Classify(self, request, context):
        self._record("Classify", context)
        return pb.ClassifyResponse(results=[pb.ClassifyResult(label="positive", probabilities={"positive": 1.0})])

    def DescribeModel(self, request, context):
        self._record("DescribeModel", context)
        return pb.ModelInfo(name=request.model, labels=["negative", "positive"])

    def CreateSession(self, request, context):
        self._record("CreateSession", context)
        return pb.Session(session_id="a" * 32, model=request.model)

    def CloseSession(self, request, context):
        self._record("CloseSession", context)
        return pb.CloseSessionResponse()

    def Generate(self, request, context):
        self._record("Generate", context)
        yield pb.GenerateResponse(text="ab", tokens_seen=2)
        yield pb.GenerateResponse(text="c", tokens_seen=3, finish_reason=pb.FINISH_REASON_LENGTH)

    def ListSessions(self, request, context):
        self._record("ListSessions", context)
        self.page_requests.append(request)
        start = int(request.page_token or 0)
        size = request.page_size or 2
        end = start + size
        following = str(end) if end < len(self.sessions) else ""
        if self.repeat_token and following:
            following = "2"
        return pb.ListSessionsResponse(sessions=self.sessions[start:end], next_page_token=following)


class Deadlines(rpc.ClassificationServicer, rpc.GenerationServicer, rpc.ModelsServicer):
    """A fake server that records the deadline each call (and each Chat message) arrives with, as
    ``time_remaining()`` in ``remaining[method]``, and holds a call whose text is "hang" until the call ends."""

    def __init__(self) -> None:
        self.remaining: dict[str, list[float | None]] = {}

    def _arrive(self, method: str, context, text: str) -> None:
        self.remaining.setdefault(method, []).append(context.time_remaining())
        if text == "hang":
            ended = threading.Event()
            context.add_callback(ended.set)
            assert ended.wait(60), "the call was not ended by its deadline"

    def Classify(self, request, context):
        self._arrive("Classify", context, request.texts[0])
        return pb.ClassifyResponse(results=[pb.ClassifyResult(label="positive", probabilities={"positive": 1.0})])

    def DescribeModel(self, request, context):
        self._arrive("DescribeModel", context, request.model)
        return pb.ModelInfo(name=request.model, labels=["negative", "positive"])

    def Generate(self, request, context):
        yield pb.GenerateResponse(text="a", tokens_seen=1)
        self._arrive("Generate", context, request.prompt)
        yield pb.GenerateResponse(text="b", tokens_seen=2, finish_reason=pb.FINISH_REASON_LENGTH)

    def Chat(self, request_iterator, context):
        for message in request_iterator:
            self._arrive("Chat", context, message.text)
            done = {"finish_reason": pb.FINISH_REASON_LENGTH} if message.text else {}
            yield pb.ChatResponse(session_id="c" * 32, text=message.text.upper(), end_of_turn=True, **done)


SERVICES = {
    rpc.ClassificationServicer: rpc.add_ClassificationServicer_to_server,
    rpc.SessionsServicer: rpc.add_SessionsServicer_to_server,
    rpc.GenerationServicer: rpc.add_GenerationServicer_to_server,
    rpc.ModelsServicer: rpc.add_ModelsServicer_to_server,
}


@pytest.fixture
def fake_server():
    """``start(servicer, credentials=None)`` serves ``servicer`` (for each lstm.v1 service it implements) on
    loopback, TLS when server credentials are given, and returns its address; every server is stopped at the end
    of the test."""
    started: list[grpc.Server] = []

    def start(servicer: object, credentials: grpc.ServerCredentials | None = None) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        for service, add in SERVICES.items():
            if isinstance(servicer, service):
                add(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(0)


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
