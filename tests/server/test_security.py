"""Tenants, authentication and limits, end to end: a tenant sees and touches only its own sessions."""

from __future__ import annotations

import logging
import time
import warnings

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client, InsecureTokenWarning, LstmError
from lstm_server.app import LstmServer, StartupError
from lstm_server.cli import main as server_main

from ..serving import ServerThread, Stubs

PROMPT = "KING:\nthe "
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


@pytest.fixture(autouse=True)
def _tokens_over_loopback_plaintext():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureTokenWarning)
        yield


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_tokens(path, tokens: dict[str, str]) -> str:
    path.write_text("# tenant token\n" + "".join(f"{tenant} {token}\n" for tenant, token in tokens.items()))
    return str(path)


@pytest.fixture
def secured(start_server, tmp_path) -> ServerThread:
    return start_server(auth_tokens=write_tokens(tmp_path / "tokens.txt", TOKENS))


def refused(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(LstmError) as error:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    assert error.value.code == code, error.value.details
    return error.value.details


def test_a_hostile_tenant_cannot_see_or_touch_another_tenants_session(secured, reference) -> None:
    with Client(secured.address, token=TOKENS["alice"]) as alice, Client(secured.address, token=TOKENS["bob"]) as bob:
        session = alice.session(model="charlm", prompt=PROMPT, seed=11, temperature=0.8)
        first = "".join(c.text for c in session.generate(max_tokens=20))
        state = session.export()
        assert [s.session_id for s in bob.list_sessions()] == []
        bob.session(model="charlm", prompt="the ")  # bob has sessions of his own; still not alice's
        assert session.id not in {s.session_id for s in bob.list_sessions()}
        unknown = "f" * 32
        raw, as_bob = Stubs(secured.address), bearer(TOKENS["bob"])
        for attempt in (
            lambda sid: raw.sessions.GetSession(pb.GetSessionRequest(session_id=sid), metadata=as_bob),
            lambda sid: raw.sessions.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=as_bob),
            lambda sid: raw.sessions.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=as_bob),
            lambda sid: raw.generation.Generate(pb.GenerateRequest(session_id=sid, prompt="x"), metadata=as_bob),
            lambda sid: raw.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=as_bob),
        ):
            with pytest.raises(grpc.RpcError) as theirs:
                result = attempt(session.id)
                if hasattr(result, "__next__"):
                    list(result)
            with pytest.raises(grpc.RpcError) as nobodys:
                result = attempt(unknown)
                if hasattr(result, "__next__"):
                    list(result)
            assert theirs.value.code() == nobodys.value.code() == grpc.StatusCode.NOT_FOUND
            assert theirs.value.details() == nobodys.value.details().replace(unknown, session.id)
        raw.channel.close()
        assert refused(grpc.StatusCode.NOT_FOUND, bob.attach, session.id)
        details = refused(grpc.StatusCode.PERMISSION_DENIED, bob.import_session, state)
        assert "belongs to another tenant" in details
        second = "".join(c.text for c in session.generate(max_tokens=20))
    expected, _, _ = reference.generate(PROMPT, 40, seed=11, temperature=0.8)
    assert first + second == expected  # exactly what alice gets with no attacker


def test_calls_without_a_valid_token_are_unauthenticated_but_health_stays_open(secured) -> None:
    with Client(secured.address, retries=0) as anonymous:
        assert "needs authentication" in refused(grpc.StatusCode.UNAUTHENTICATED, anonymous.models)
    with Client(secured.address, token="not-a-token-at-all", retries=0) as stranger:
        assert "unknown bearer token" in refused(grpc.StatusCode.UNAUTHENTICATED, stranger.models)
    stubs = Stubs(secured.address)
    with pytest.raises(grpc.RpcError) as basic:
        stubs.models.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Basic abc"),))
    assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in basic.value.details()
    health = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stubs.channel.close()


def test_the_token_file_is_reread_when_it_changes(secured, tmp_path) -> None:
    with Client(secured.address, token=TOKENS["bob"], retries=0) as bob:
        assert bob.models()
        time.sleep(0.01)  # a new modification time
        write_tokens(tmp_path / "tokens.txt", {"alice": TOKENS["alice"], "carol": "carol-token-0123456789"})
        assert "unknown bearer token" in refused(grpc.StatusCode.UNAUTHENTICATED, bob.models)
    with Client(secured.address, token="carol-token-0123456789") as carol:
        assert carol.session(model="charlm", prompt=PROMPT).info.tenant == "carol"


def test_per_tenant_limits_name_the_tenant_and_spare_the_others(start_server, tmp_path) -> None:
    running = start_server(
        auth_tokens=write_tokens(tmp_path / "tokens.txt", TOKENS), tenant_max_sessions=2, tenant_max_turns=1
    )
    with Client(running.address, token=TOKENS["alice"], retries=0) as alice:
        with Client(running.address, token=TOKENS["bob"], retries=0) as bob:
            one, two = (alice.session(model="charlm", prompt=PROMPT) for _ in range(2))
            details = refused(grpc.StatusCode.RESOURCE_EXHAUSTED, alice.session, model="charlm", prompt=PROMPT)
            assert "tenant 'alice' holds 2 sessions, its limit (tenant_max_sessions)" in details
            mine = bob.session(model="charlm", prompt=PROMPT)
            long_turn = one.generate(max_tokens=4000)
            next(long_turn)  # alice's one turn is running
            details = refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: list(two.generate(max_tokens=2)))
            assert "tenant 'alice' runs 1 turns at once, its limit (tenant_max_turns)" in details
            assert len("".join(c.text for c in mine.generate(max_tokens=5))) == 5
            long_turn.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the cancelled turn ends and frees alice's turn
                try:
                    assert len("".join(c.text for c in two.generate(max_tokens=2))) == 2
                    break
                except LstmError as error:
                    assert error.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)
                    time.sleep(0.02)
            else:
                pytest.fail("the cancelled turn never freed the tenant's turn")


def test_without_authentication_only_the_servers_own_limits_apply(start_server) -> None:
    running = start_server(tenant_max_sessions=1, tenant_max_turns=1)  # one tenant: the whole server
    with Client(running.address) as client:
        one, two = (client.session(model="charlm", prompt=PROMPT) for _ in range(2))
        long_turn = one.generate(max_tokens=4000)
        next(long_turn)
        assert len("".join(c.text for c in two.generate(max_tokens=3))) == 3
        long_turn.close()


def test_list_sessions_pages_through_the_callers_sessions_only(server) -> None:
    stubs = Stubs(server.address)
    made = [
        stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="the ")).session_id
        for _ in range(25)
    ]
    listed, token, pages = [], "", 0
    while True:
        page = stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=10, page_token=token))
        assert len(page.sessions) <= 10
        listed += [s.session_id for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert [s for s in listed if s in made] == made  # oldest first, each once
    assert len(listed) == len(set(listed)) and pages >= 3
    for request, message in (
        (pb.ListSessionsRequest(page_token="garbage"), "page_token is not one this server gave"),
        (pb.ListSessionsRequest(page_size=-1), "page_size must be >= 0"),
    ):
        with pytest.raises(grpc.RpcError) as bad:
            stubs.sessions.ListSessions(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in bad.value.details()
    for session_id in made:
        stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    stubs.channel.close()


async def make_server(config) -> LstmServer:
    return LstmServer(config)


def test_a_second_server_on_a_port_in_use_refuses_to_start(server, capsys, monkeypatch) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # the CLI sets up its own; the test's stay
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{server.server.port}: the port is in use"):
        server.run(make_server(ServerThread.settings(server.config.models, port=server.server.port)))
    capsys.readouterr()  # the in-process start's own lines
    argv = [
        "--models",
        server.config.models,
        "--port",
        str(server.server.port),
        "--metrics-port",
        "0",
        "--http-port",
        "0",
    ]
    assert server_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # the one clear line, and nothing before it: no warning, no model loaded, no line of gRPC's own
    assert err.splitlines() == [
        f"lstm-server: cannot listen on 127.0.0.1:{server.server.port}: the port is in use (or the address is not "
        "this machine's); stop the other server or choose another --port"
    ]


class PeerWithCertificate:
    """A call context whose client certificate names ``common_name`` (as gRPC's auth context gives it)."""

    def __init__(self, common_name: bytes) -> None:
        self.common_name = common_name

    def invocation_metadata(self):
        return ()

    def auth_context(self):
        return {"x509_common_name": [self.common_name]}


def test_a_certificate_name_is_the_tenant_and_never_cut_or_mended() -> None:
    from lstm_server.api.auth import Authenticator
    from lstm_server.config import ServerConfig
    from lstm_server.errors import ServiceError, Status

    authenticator = Authenticator(ServerConfig(tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem"))
    assert authenticator.tenant(PeerWithCertificate(b"alice")) == "alice"
    for refused in (b"a" * 129, b"caf\xff", b""):
        with pytest.raises(ServiceError) as error:
            authenticator.tenant(PeerWithCertificate(refused))
        assert error.value.code == Status.UNAUTHENTICATED and "subject CN must be 1 to 128" in error.value.message


def test_an_expired_certificate_is_warned_about_at_start(tmp_path, caplog) -> None:
    """Clients refuse an expired certificate and see only that the socket closed: the server says so in its log."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from lstm_server.api.auth import ServerTls
    from lstm_server.config import ServerConfig

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    for ended_days_ago, warned in ((1, True), (-30, False)):
        cert = (
            x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=60))
            .not_valid_after(now - datetime.timedelta(days=ended_days_ago))
            .sign(key, hashes.SHA256())
        )
        cert_path, key_path = tmp_path / f"cert{ended_days_ago}.pem", tmp_path / f"key{ended_days_ago}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lstm_server"):
            ServerTls(ServerConfig(models="unused", tls_cert=str(cert_path), tls_key=str(key_path)))
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(messages) == warned, messages
        if warned:
            assert f"--tls-cert {cert_path} is expired" in messages[0] and "issue a new certificate" in messages[0]
