"""The client's token and TLS: the token on every call (unary and streaming, sync and asyncio), TLS against a
private CA, mutual TLS (the tenant is the certificate's CN), a server name override; against fake servers that
record what arrives and against the real server."""

from __future__ import annotations

import asyncio
import warnings

import grpc
import pytest

from lstm_client import AsyncClient, Client, InsecureTokenWarning, LstmError, TlsConfig, Unavailable
from lstm_client.transport import auth_metadata, is_loopback, tls_config

from .conftest import TOKENS, Recorder, server_credentials


def test_the_token_goes_with_every_call(fake_server) -> None:
    recorder = Recorder()
    address = fake_server(recorder)
    with Client(address, token="t0k3n") as client:
        client.classify(["x"])
        with client.session(model="charlm") as session:
            assert "".join(c.text for c in session.generate("hi")) == "abc"
        client.list_sessions()
    assert [c[0] for c in recorder.calls] == ["Classify", "CreateSession", "Generate", "CloseSession", "ListSessions"]
    assert {c[1] for c in recorder.calls} == {"Bearer t0k3n"}


def test_the_async_client_sends_the_token_too(fake_server) -> None:
    recorder = Recorder(sessions=3)
    address = fake_server(recorder)

    async def run() -> str:
        async with AsyncClient(address, token="t0k3n") as client:
            await client.classify(["x"])
            assert len(await client.list_sessions(page_size=2)) == 3
            async with client.session(model="charlm") as session:
                return "".join([c.text async for c in session.generate("hi")])

    assert asyncio.run(run()) == "abc"
    assert {c[1] for c in recorder.calls} == {"Bearer t0k3n"} and len(recorder.calls) == 6


def test_without_a_token_no_authorization_is_sent(fake_server) -> None:
    recorder = Recorder()
    with Client(fake_server(recorder)) as client:
        client.classify(["x"])
    assert recorder.calls == [("Classify", None, None)]


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak", "caf\u00e9"])
def test_a_token_that_cannot_be_metadata_is_refused_at_once(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", token=token)


def test_a_token_over_plaintext_off_this_machine_warns() -> None:
    with pytest.warns(InsecureTokenWarning, match="only for a server on loopback"):
        Client("lstm.example.com:443", token="t").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for target in ("127.0.0.1:5", "localhost:5", "[::1]:5", "unix:/tmp/s", "dns:///localhost:5"):
            Client(target, token="t").close()
        Client("lstm.example.com:443").close()  # no token: nothing to leak
        Client("lstm.example.com:443", token="t", tls=True).close()


def test_loopback_targets() -> None:
    assert all(map(is_loopback, ["127.0.0.1:50051", "127.3.4.5:1", "localhost:1", "[::1]:1", "ipv4:127.0.0.1:1"]))
    assert not any(map(is_loopback, ["10.0.0.1:1", "gateway:8080", "[2001:db8::1]:1", "dns:///example.com:443"]))


def test_tls_settings() -> None:
    assert tls_config(None) is None and tls_config(False) is None
    assert tls_config(True) == TlsConfig()
    with pytest.raises(ValueError, match="cert and key go together"):
        TlsConfig(cert="client.pem")
    with pytest.raises(TypeError):
        tls_config("yes")  # type: ignore[arg-type]
    assert auth_metadata("abc") == (("authorization", "Bearer abc"),) and auth_metadata(None) == ()
    with pytest.raises(FileNotFoundError, match=r"missing\.pem"):
        Client("127.0.0.1:1", tls=TlsConfig(ca="missing.pem"))


def test_tls_with_the_private_ca_and_refused_otherwise(fake_server, pki) -> None:
    recorder = Recorder()
    address = fake_server(recorder, server_credentials(pki.server_cert, pki.server_key))
    with Client(address, tls=TlsConfig(ca=pki.ca), token="t") as client:
        assert client.classify(["x"])[0].label == "positive"
    assert recorder.calls == [("Classify", "Bearer t", None)]
    for tls in (None, True, TlsConfig(ca=pki.other_ca)):  # plaintext; the public roots; another CA
        with Client(address, tls=tls, retries=0, timeout=5) as client, pytest.raises(Unavailable):
            client.classify(["x"])
    assert len(recorder.calls) == 1


def test_server_name_override(fake_server, pki) -> None:
    """A certificate for lstm.internal only: reached as 127.0.0.1, it verifies with server_name."""
    address = fake_server(Recorder(), server_credentials(pki.internal_cert, pki.internal_key))
    with Client(address, tls=TlsConfig(ca=pki.ca), retries=0, timeout=5) as client, pytest.raises(Unavailable):
        client.classify(["x"])
    with Client(address, tls=TlsConfig(ca=pki.ca, server_name="lstm.internal")) as client:
        assert client.classify(["x"])[0].label == "positive"


def test_mutual_tls_presents_the_client_certificate(fake_server, pki) -> None:
    recorder = Recorder()
    address = fake_server(recorder, server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca))
    cert, key = pki.clients["bob"]
    with Client(address, tls=TlsConfig(ca=pki.ca, cert=cert, key=key)) as client:
        client.classify(["x"])
    assert recorder.calls == [("Classify", None, "bob")]
    for tls in (TlsConfig(ca=pki.ca), TlsConfig(ca=pki.ca, cert=pki.stranger[0], key=pki.stranger[1])):
        with Client(address, tls=tls, retries=0, timeout=5) as client, pytest.raises(Unavailable):
            client.classify(["x"])
    assert len(recorder.calls) == 1


def test_real_server_tls_and_tokens(tls_server, pki) -> None:
    tls = TlsConfig(ca=pki.ca)
    with Client(tls_server.address, tls=tls, token=TOKENS["alice"]) as alice:
        with alice.session(model="charlm", prompt="KING:") as session:
            assert session.info.tenant == "alice"
            text = "".join(c.text for c in session.generate(max_tokens=12, seed=3))
            state = session.export()
        assert len(text) == 12 and state.tenant == "alice" and state.mac
        restored = alice.import_session(state)
        assert restored.refresh().tokens_seen == len("KING:") + 12
        with Client(tls_server.address, tls=tls, token=TOKENS["bob"]) as bob:
            assert restored.id not in {s.session_id for s in bob.list_sessions()}
        restored.close()
    for token in (None, "not-a-token"):
        with Client(tls_server.address, tls=tls, token=token, retries=0) as client:
            with pytest.raises(LstmError) as failure:
                client.models()
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(tls_server.address, token=TOKENS["alice"], retries=0, timeout=5) as plain:
        with pytest.raises(Unavailable):
            plain.models()


def test_real_server_async_client_over_tls(tls_server, pki) -> None:
    async def run() -> tuple[str, int]:
        async with AsyncClient(tls_server.address, tls=TlsConfig(ca=pki.ca), token=TOKENS["bob"]) as client:
            async with client.session(model="charlm", prompt="KING:") as session:
                text = "".join([c.text async for c in session.generate(max_tokens=9, seed=1)])
                listed = [s.session_id for s in await client.list_sessions(page_size=1)]
                assert session.id in listed
                return text, (await session.refresh()).tokens_seen

    text, seen = asyncio.run(run())
    assert len(text) == 9 and seen == len("KING:") + 9


def test_real_server_mutual_tls_tenant_is_the_certificate_cn(mtls_server, pki) -> None:
    cert, key = pki.clients["alice"]
    with Client(mtls_server.address, tls=TlsConfig(ca=pki.ca, cert=cert, key=key)) as alice:
        with alice.session(model="charlm") as session:
            assert session.info.tenant == "alice"
            cert, key = pki.clients["bob"]
            with Client(mtls_server.address, tls=TlsConfig(ca=pki.ca, cert=cert, key=key)) as bob:
                assert session.id not in {s.session_id for s in bob.list_sessions()}
                with pytest.raises(LstmError) as failure:
                    bob.attach(session.id)
                assert failure.value.code == grpc.StatusCode.NOT_FOUND
    for tls in (TlsConfig(ca=pki.ca), TlsConfig(ca=pki.ca, cert=pki.stranger[0], key=pki.stranger[1])):
        with Client(mtls_server.address, tls=tls, retries=0, timeout=5) as client, pytest.raises(Unavailable):
            client.models()
