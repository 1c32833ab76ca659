"""Certificates (deploy/certs.py), token files and secured servers for the client's tests."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import certs
import grpc
import pytest
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from ..conftest import ServerThread

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
def tls_server(exported, pki, tmp_path_factory):
    """A real server: TLS, bearer tokens for alice and bob."""
    tokens = write_tokens(tmp_path_factory.mktemp("tokens") / "tokens", TOKENS)
    running = ServerThread(
        exported, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), auth_tokens=str(tokens)
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(exported, pki):
    """A real server that requires client certificates signed by the CA (the tenant is the certificate's CN)."""
    running = ServerThread(
        exported, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    yield running
    running.stop()


class Recorder(rpc.ClassificationServicer, rpc.SessionsServicer, rpc.GenerationServicer):
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


@pytest.fixture
def fake_server():
    """``start(recorder, credentials=None)`` serves a Recorder on loopback (TLS when server credentials are
    given) and returns its address; every server is stopped at the end of the test."""
    started: list[grpc.Server] = []

    def start(recorder: Recorder, credentials: grpc.ServerCredentials | None = None) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rpc.add_ClassificationServicer_to_server(recorder, server)
        rpc.add_SessionsServicer_to_server(recorder, server)
        rpc.add_GenerationServicer_to_server(recorder, server)
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
