"""list_sessions follows the pages; the numpy-free tensor helpers; the CLI's connection flags and environment."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from array import array

import grpc
import numpy as np
import pytest
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client, LstmError, make_tensor, tensor_shape, tensor_values
from lstm_client.cli import main as cli_main

from .conftest import TOKENS, Recorder, server_credentials

# -- list_sessions -----------------------------------------------------------------------------------------------


def test_list_sessions_follows_every_page_with_the_page_size(fake_server) -> None:
    recorder = Recorder(sessions=7)
    with Client(fake_server(recorder)) as client:
        listed = client.list_sessions("charlm", page_size=3)
    assert [s.session_id for s in listed] == [s.session_id for s in recorder.sessions]
    assert [(r.page_size, r.page_token, r.model) for r in recorder.page_requests] == [
        (3, "", "charlm"),
        (3, "3", "charlm"),
        (3, "6", "charlm"),
    ]


def test_list_sessions_refuses_a_server_that_repeats_a_page_token(fake_server) -> None:
    with Client(fake_server(Recorder(sessions=9, repeat_token=True))) as client, pytest.raises(LstmError) as failure:
        client.list_sessions(page_size=2)
    assert failure.value.code == grpc.StatusCode.INTERNAL and "repeated the page token" in failure.value.details


def test_list_sessions_pages_on_the_real_server(server) -> None:
    with Client(server.address) as client:
        made = [client.session(model="charlm") for _ in range(5)]
        try:
            listed = [s.session_id for s in client.list_sessions(page_size=2)]
            assert [i for i in listed if i in {s.id for s in made}] == [s.id for s in made]  # oldest first, once
            assert len(listed) == len(set(listed))
        finally:
            for session in made:
                session.close()


# -- tensors ------------------------------------------------------------------------------------------------------


def test_tensors_are_little_endian_float32_row_major() -> None:
    tensor = make_tensor([1.0, -2.5, 3.25, 0.0, 1e-3, 7.0], shape=(2, 3))
    assert list(tensor.shape) == [2, 3] and tensor_shape(tensor) == (2, 3)
    assert tensor.data == struct.pack("<6f", 1.0, -2.5, 3.25, 0.0, 1e-3, 7.0)
    assert tensor_values(tensor) == array("f", [1.0, -2.5, 3.25, 0.0, 1e-3, 7.0])
    # what numpy reads from the same bytes
    assert np.frombuffer(tensor.data, "<f4").reshape(tensor.shape)[1, 2] == 7.0
    assert list(make_tensor(range(4)).shape) == [4]
    assert tensor_values(pb.Tensor()) == array("f")  # an absent tensor has no values
    assert math.isnan(tensor_values(make_tensor([math.nan]))[0])


BIG_ENDIAN_HOST = """
import json, sys
sys.byteorder = "big"  # what a big-endian host says, before lstm_client reads it
from lstm_client import make_tensor, tensor_values
tensor = make_tensor([1.5, -2.0])
print(json.dumps({"data": tensor.data.hex(), "values": list(tensor_values(tensor))}))
"""


def test_tensors_are_little_endian_on_a_big_endian_host_too() -> None:
    """A big-endian host swaps its native bytes on the way out and back on the way in. Simulated on this
    little-endian host by a process whose ``sys.byteorder`` says big: the bytes go out swapped and come back as
    the same values."""
    done = subprocess.run([sys.executable, "-c", BIG_ENDIAN_HOST], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    made = json.loads(done.stdout)
    assert bytes.fromhex(made["data"]) == struct.pack(">2f", 1.5, -2.0)
    assert array("f", made["values"]) == array("f", [1.5, -2.0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(shape=[2], data=b"\0" * 7), "not a whole number of float32"),
        (pb.Tensor(shape=[3], data=b"\0" * 8), "needs 3 values, its data holds 2"),
        (pb.Tensor(shape=[-1, -2], data=b"\0" * 8), "needs 2 values"),
    ],
)
def test_tensor_values_check_the_shape(tensor: pb.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensor_values(tensor)


def test_make_tensor_checks_the_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \[2, 2\] holds 4 values, not 3"):
        make_tensor([1, 2, 3], shape=(2, 2))


def test_step_carries_state_as_tensors(server, reference) -> None:
    """Step's (h, c) come back as bytes tensors equal to the reference, and go back in as messages or as plain
    (values, shape) pairs."""
    with Client(server.address) as client:
        first = client.step("charlm", text="KING:")
        _, h, c = reference.feed("KING:")
        assert tensor_shape(first.h) == h.shape
        np.testing.assert_allclose(tensor_values(first.h), h.ravel(), atol=1e-5)
        np.testing.assert_allclose(tensor_values(first.c), c.ravel(), atol=1e-5)
        again = client.step("charlm", text="\n", state=first.state)
        plain = ((list(tensor_values(first.h)), h.shape), (list(tensor_values(first.c)), c.shape))
        assert client.step("charlm", text="\n", state=plain).probabilities == again.probabilities
        with pytest.raises(ValueError, match="needs"):
            client.step("charlm", text="\n", state=(pb.Tensor(shape=[9], data=b""), first.c))


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_tls_flags_and_the_token_from_the_environment(fake_server, pki, monkeypatch, capsys) -> None:
    recorder = Recorder(sessions=3)
    address = fake_server(recorder, server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca))
    cert, key = pki.clients["alice"]
    monkeypatch.setenv("LSTM_CLIENT_TOKEN", "from-env")
    tls = ["--ca", str(pki.ca), "--cert", str(cert), "--key", str(key)]
    assert cli_main(["--server", address, *tls, "classify", "good"]) == 0
    assert capsys.readouterr().out.startswith("positive\tpositive 1.000\tgood")
    assert cli_main(["--server", address, *tls, "--token", "from-flag", "sessions", "--page-size", "2"]) == 0
    assert capsys.readouterr().out.count("charlm/0") == 3
    assert recorder.calls == [
        ("Classify", "Bearer from-env", "alice"),
        ("DescribeModel", "Bearer from-env", "alice"),  # the labels' order
        ("ListSessions", "Bearer from-flag", "alice"),
        ("ListSessions", "Bearer from-flag", "alice"),
    ]
    monkeypatch.setenv("LSTM_CLIENT_SERVER", address)
    monkeypatch.setenv("LSTM_CLIENT_CA", str(pki.ca))
    monkeypatch.setenv("LSTM_CLIENT_CERT", str(cert))
    monkeypatch.setenv("LSTM_CLIENT_KEY", str(key))
    assert cli_main(["classify", "fine"]) == 0  # everything from the environment
    assert recorder.calls[-2] == ("Classify", "Bearer from-env", "alice")


def test_cli_errors_are_one_line(fake_server, pki, capsys, tmp_path) -> None:
    address = fake_server(Recorder(), server_credentials(pki.server_cert, pki.server_key))
    assert cli_main(["--server", address, "--ca", str(tmp_path / "none.pem"), "classify", "x"]) == 1
    assert "lstm-client:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--server", address, "--cert", str(pki.ca), "classify", "x"])  # a certificate without its key
    assert "cert and key go together" in capsys.readouterr().err


def test_cli_against_the_real_server(tls_server, pki, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LSTM_CLIENT_TOKEN", TOKENS["bob"])
    assert cli_main(["--server", tls_server.address, "--ca", str(pki.ca), "classify", "a gorgeous film"]) == 0
    assert capsys.readouterr().out.endswith("\ta gorgeous film\n")
    monkeypatch.setenv("LSTM_CLIENT_TOKEN", "wrong")
    assert cli_main(["--server", tls_server.address, "--ca", str(pki.ca), "sessions"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
