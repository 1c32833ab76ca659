"""The HTTP port with real clients (tritonclient.http, the openai SDK, curl, an SSE reader) against a server on the
shipped models: every endpoint answers as its protocol says, generation is bitwise what lstm.v1 gives for the same
prompt and parameters, errors have the right status and body, tenants stay apart, and no generated request gets a
5xx (schemathesis over the server's own OpenAPI document)."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import cluster
import grpc
import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from lstm.v1 import lstm_pb2 as pb

from ..serving import ServerThread, Stubs

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
DOC = ROOT / "docs" / "http.md"


@pytest.fixture(scope="module")
def served():
    """A server on the shipped models (their default versions), HTTP on a free port."""
    running = ServerThread(MODELS, http_port=cluster.free_port())
    running.http = f"127.0.0.1:{running.server.http.port}"
    running.base = f"http://{running.http}"
    yield running
    running.stop()


@pytest.fixture
def lstm(served):
    stubs = Stubs(served.address)
    yield stubs
    stubs.channel.close()


def lstm_text(stubs: Stubs, prompt: str, **sampling) -> str:
    """What lstm.v1 generates on a new session for ``prompt``."""
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm"))
    try:
        request = pb.GenerateRequest(
            session_id=session.session_id, prompt=prompt, sampling=pb.SamplingParams(**sampling)
        )
        return "".join(r.text for r in stubs.generation.Generate(request))
    finally:
        stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))


def sse(response: requests.Response) -> list:
    """The data of each server-sent event, JSON-decoded ("[DONE]" as is)."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- KServe v2 REST with tritonclient.http ------------------------------------------------------------------------


def test_tritonclient_http_health_metadata_config_and_classification(served, lstm):
    client = triton_http.InferenceServerClient(served.http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sentiment") and not client.is_model_ready("no-such-model")
    assert client.get_server_metadata()["name"] == "lstm-server"
    metadata = client.get_model_metadata("charlm")
    assert [t["name"] for t in metadata["inputs"]] == ["TEXT"] and metadata["inputs"][0]["shape"] == [1]
    config = client.get_model_config("charlm")
    assert config["model_transaction_policy"]["decoupled"] is True
    assert {m["name"] for m in client.get_model_repository_index()} == {"charlm", "sentiment"}

    texts = ["a gorgeous , witty film", "dull and lifeless"]
    for binary in (True, False):
        text = triton_http.InferInput("TEXT", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        outputs = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in ("LABEL", "PROBS")]
        result = client.infer("sentiment", [text], outputs=outputs)
        expected = lstm.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=texts))
        labels = [label if isinstance(label, str) else label.decode() for label in result.as_numpy("LABEL")]
        assert labels == [r.label for r in expected.results]  # JSON data comes back as str, binary as bytes
        names = lstm.models.DescribeModel(pb.DescribeModelRequest(model="sentiment")).labels
        probabilities = [[r.probabilities[name] for name in names] for r in expected.results]
        np.testing.assert_array_equal(result.as_numpy("PROBS"), np.array(probabilities, np.float32))
    statistics = client.get_inference_statistics("sentiment")["model_stats"][0]
    assert statistics["inference_stats"]["success"]["count"] >= 2


def test_tritonclient_http_sequence_is_the_grpc_sequence_and_lstm_v1_text(served, lstm):
    """A sequence over three HTTP requests (the middle one over gRPC: one session behind both) gives the text of
    three lstm.v1 turns."""
    http = triton_http.InferenceServerClient(served.http)
    grpc_client = triton_grpc.InferenceServerClient(served.address)
    prompts, sampling = ["ROMEO:", " and ", "\nJULIET:"], {"temperature": 0.8, "seed": 11, "max_tokens": 40}

    def request(module, prompt):
        text = module.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        return [text]

    parameters = {name: value for name, value in sampling.items()}
    got = []
    for i, prompt in enumerate(prompts):
        flags = {"sequence_id": 4242, "sequence_start": i == 0, "sequence_end": i == 2, "parameters": parameters}
        if i == 1:
            result = grpc_client.infer("charlm", request(triton_grpc, prompt), **flags)
        else:
            result = http.infer("charlm", request(triton_http, prompt), **flags)
        got.append(result.as_numpy("TEXT_OUT")[0].decode())
    session = lstm.sessions.CreateSession(pb.CreateSessionRequest(model="charlm"))
    expected = []
    for prompt in prompts:
        turn = pb.GenerateRequest(session_id=session.session_id, prompt=prompt, sampling=pb.SamplingParams(**sampling))
        expected.append("".join(r.text for r in lstm.generation.Generate(turn)))
    assert got == expected
    grpc_client.close()


# -- Triton's generate extension ------------------------------------------------------------------------------------


def test_generate_and_generate_stream_give_lstm_v1_text(served, lstm):
    body = {"text_input": "KING:", "max_tokens": 60, "parameters": {"temperature": 0.9, "seed": 5}}
    whole = requests.post(f"{served.base}/v2/models/charlm/generate", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    expected = lstm_text(lstm, "KING:", temperature=0.9, seed=5, max_tokens=60)
    assert whole.json()["text_output"] == expected
    assert whole.json()["finish_reason"] == "length" and whole.json()["model_name"] == "charlm"

    streamed = requests.post(f"{served.base}/v2/models/charlm/generate_stream", json=body, timeout=60, stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse(streamed)
    assert "".join(e["text_output"] for e in events) == expected and len(events) >= 2
    assert events[-1]["finish_reason"] == "length" and "finish_reason" not in events[0]


def test_generate_continues_a_server_held_session(served, lstm):
    session = lstm.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="First Citizen:"))
    headers = {"x-session-id": session.session_id}
    body = {"text_input": "", "max_tokens": 30, "temperature": 0}
    got = requests.post(f"{served.base}/v2/models/charlm/generate", json=body, headers=headers, timeout=60).json()
    after = lstm.sessions.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert after.tokens_seen == len("First Citizen:") + 30 and got["tokens_seen"] == after.tokens_seen
    assert got["text_output"] == lstm_text(lstm, "First Citizen:", temperature=0, max_tokens=30)
    mixed = {**body, "sequence_id": 7}
    refused = requests.post(f"{served.base}/v2/models/charlm/generate", json=mixed, headers=headers, timeout=60)
    assert refused.status_code == 400 and refused.json()["reason"] == "UNKNOWN_PARAMETER"


# -- OpenAI-compatible ------------------------------------------------------------------------------------------


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=60) as made:
        yield made


def test_openai_models_and_completions_match_lstm_v1(client, lstm):
    assert {m.id for m in client.models.list()} == {"charlm", "sentiment"}
    greedy = client.completions.create(model="charlm", prompt="ROMEO:", max_tokens=50, temperature=0)
    assert greedy.choices[0].text == lstm_text(lstm, "ROMEO:", temperature=0, max_tokens=50)
    assert greedy.choices[0].finish_reason == "length"
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (6, 50)

    seeded = client.completions.create(model="charlm", prompt="ROMEO:", max_tokens=50, seed=9, n=2, top_p=0.9)
    for i, choice in enumerate(sorted(seeded.choices, key=lambda c: c.index)):
        assert choice.text == lstm_text(lstm, "ROMEO:", temperature=1, top_p=0.9, seed=9 + i, max_tokens=50)
    assert seeded.choices[0].text != seeded.choices[1].text

    stream = client.completions.create(
        model="charlm",
        prompt="ROMEO:",
        max_tokens=50,
        seed=9,
        top_p=0.9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == seeded.choices[0].text
    assert chunks[-1].usage.completion_tokens == 50 and chunks[-2].choices[0].finish_reason == "length"


def test_openai_completion_continues_a_server_held_session(client, lstm):
    session = lstm.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="ROMEO:"))
    headers = {"x-session-id": session.session_id}
    result = client.completions.create(
        model="charlm", prompt=" and", max_tokens=20, temperature=0, extra_headers=headers
    )
    assert result.choices[0].text == lstm_text(lstm, "ROMEO: and", temperature=0, max_tokens=20)
    after = lstm.sessions.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert after.tokens_seen == len("ROMEO: and") + 20  # the session kept the turn
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="charlm", prompt="x", n=2, extra_headers=headers)


def test_openai_logprobs_are_the_models_own(client, lstm):
    """Each character's log probability is the log of lstm.v1 Step's probability after the text before it."""
    result = client.completions.create(model="charlm", prompt="ROMEO:", max_tokens=12, seed=3, logprobs=3)
    choice = result.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.text_offset == list(range(12))
    vocabulary = list(lstm.models.DescribeModel(pb.DescribeModelRequest(model="charlm")).vocabulary)
    response = lstm.generation.Step(pb.StepRequest(model="charlm", text="ROMEO:"))
    for char, logprob, top in zip(
        choice.text, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        probabilities = np.array(response.probabilities, np.float32)
        index = vocabulary.index(char)
        assert logprob == pytest.approx(float(np.log(np.float64(probabilities[index]))), abs=1e-9)
        assert len(top) == 3 and max(top.values()) == pytest.approx(
            float(np.log(np.float64(probabilities.max()))), abs=1e-9
        )
        response = lstm.generation.Step(pb.StepRequest(model="charlm", text=char, h=response.h, c=response.c))


def test_openai_refusals_are_openai_shaped(client, served):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="charlm", prompt="ROMEO:", best_of=3)
    assert refused.value.body["code"] == "UNSUPPORTED_PARAMETER" and refused.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="charlm", prompt="x", echo=True, logprobs=1)
    assert refused.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="charlm", prompt="x", extra_body={"tools": []})
    assert "tools is not a completions parameter" in refused.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt="x")
    assert "gpt-9" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="charlm", messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["code"] == "NO_CHAT_FORMAT"
    with pytest.raises(openai.BadRequestError) as classifier:
        client.completions.create(model="sentiment", prompt="x")
    assert "sentiment" in classifier.value.body["message"]


# -- errors, limits and statuses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "data", "headers", "status", "reason"),
    [
        ("/v2/models/charlm/infer", b"{not json", {}, 400, "INVALID_JSON"),
        ("/v2/models/charlm/infer", b"[" * 100_000, {}, 400, "INVALID_JSON"),
        ("/v2/models/charlm/infer", b"{}", {"content-type": "text/plain"}, 415, "UNSUPPORTED_MEDIA"),
        ("/v2/models/nope/infer", b'{"inputs": []}', {}, 404, "MODEL_NOT_FOUND"),
        (
            "/v2/models/sentiment/infer",
            b'{"inputs": [{"name": "X", "shape": [1], "datatype": "BYTES"}]}',
            {},
            400,
            "INVALID_INPUT",
        ),
        ("/v2/models/charlm/generate", b'{"text_input": "a", "temperature": "hot"}', {}, 400, "INVALID_PARAMETER"),
        ("/v2/models/charlm/generate", b'{"text_input": "a", "bogus": 1}', {}, 400, "UNKNOWN_PARAMETER"),
        ("/v2/models/charlm/generate", b'{"text_input": "\\u00e9"}', {}, 400, "UNKNOWN_CHARACTERS"),
        ("/v2/models/charlm/generate", b'{"text_input": "a"}', {"x-session-id": "f" * 32}, 404, "SESSION_NOT_FOUND"),
        ("/v2/models/charlm/generate", b'{"text_input": "a"}', {"x-session-id": "nope"}, 400, "INVALID_SESSION_ID"),
        ("/v2/nothing", b"", {}, 404, "NO_ROUTE"),
    ],
)
def test_errors_have_the_right_status_and_reason(served, path, data, headers, status, reason):
    response = requests.post(served.base + path, data=data, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason and response.json()["error"]
    assert response.headers["x-request-id"]


def test_a_body_over_the_limit_is_413_and_a_slow_body_408(start_server, exported):
    port = cluster.free_port()
    start_server(http_port=port, max_message_bytes=4096, http_body_timeout_s=0.5)
    big = requests.post(f"http://127.0.0.1:{port}/v1/completions", data=b"x" * 10_000, timeout=30)
    assert big.status_code == 413 and "4096" in big.json()["error"]["message"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        started = time.monotonic()
        answer = slow.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - started < 5


def test_http_drains_with_grpc(exported):
    """On stop: not ready during the drain delay, a running stream finishes, then the port refuses."""
    port = cluster.free_port()
    running = ServerThread(exported, http_port=port, drain_delay_s=1.0)
    base = f"http://127.0.0.1:{port}"
    body = {"text_input": "a", "max_tokens": 3000, "temperature": 0}
    stream = requests.post(f"{base}/v2/models/charlm/generate_stream", json=body, stream=True, timeout=60)
    stopping = threading.Thread(target=running.stop, kwargs={"grace": 30})
    stopping.start()
    deadline = time.monotonic() + 10
    while requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200:
        assert time.monotonic() < deadline, "readiness never turned false"
        time.sleep(0.05)
    events = sse(stream)
    assert events[-1]["finish_reason"] == "length" and events[-1]["tokens_seen"] == 3001
    stopping.join(30)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/v2/health/live", timeout=10)


def test_a_completion_over_the_session_limit_is_429_and_leaves_no_session(start_server):
    port = cluster.free_port()
    start_server(http_port=port, max_sessions=3)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "charlm", "prompt": "a", "max_tokens": 5}
    refused = requests.post(url, json={**body, "n": 5}, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "SESSION_LIMIT"
    assert requests.post(url, json={**body, "n": 3}, timeout=30).status_code == 200  # its sessions were closed


def test_https_with_the_grpc_ports_certificate_and_an_idle_client_does_not_hold_the_drain(exported, tmp_path):
    """An idle keep-alive HTTPS client never answers the server's TLS close_notify: the drain must not wait the
    grace period for it (it did: uvicorn waited the whole period for every such connection)."""
    import certs

    ca = certs.make_ca()
    server_cert = certs.make_server_cert(ca, ["localhost"])
    server_cert.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    port = cluster.free_port()
    tls = {"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")}
    running = ServerThread(exported, http_port=port, grace_period_s=60, **tls)
    with requests.Session() as kept_alive:
        secure = kept_alive.get(f"https://localhost:{port}/v1/models", verify=str(tmp_path / "ca.pem"), timeout=30)
        assert secure.status_code == 200 and {m["id"] for m in secure.json()["data"]} == {"charlm", "sentiment"}
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://localhost:{port}/v1/models", timeout=30)
        started = time.monotonic()
        running.stop(grace=None)  # the configured 60 s
        assert time.monotonic() - started < 30, "the drain waited for an idle connection"


def test_statuses_follow_grpc_gateway():
    from lstm_server.api.http.errors import HTTP_STATUS
    from lstm_server.errors import Status

    # grpc-gateway's HTTPStatusFromCode for the codes this server answers with
    expected = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
                "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
                "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "INTERNAL": 500,
                "DATA_LOSS": 500}  # fmt: skip
    assert {code.name: HTTP_STATUS[code] for code in Status} == expected


def test_tenants_are_apart_over_http(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token\nbob bob-token\n")
    port = cluster.free_port()
    running = start_server(http_port=port, auth_tokens=str(tokens))
    base = f"http://127.0.0.1:{port}"
    channel = grpc.insecure_channel(running.address)
    create = channel.unary_unary(
        "/lstm.v1.Sessions/CreateSession",
        request_serializer=pb.CreateSessionRequest.SerializeToString,
        response_deserializer=pb.Session.FromString,
    )
    alice = create(pb.CreateSessionRequest(model="charlm"), metadata=[("authorization", "Bearer alice-token")])
    body = {"text_input": "a", "max_tokens": 3}
    as_bob = {"authorization": "Bearer bob-token", "x-session-id": alice.session_id}
    stolen = requests.post(f"{base}/v2/models/charlm/generate", json=body, headers=as_bob, timeout=30)
    as_alice = {"authorization": "Bearer alice-token", "x-session-id": alice.session_id}
    own = requests.post(f"{base}/v2/models/charlm/generate", json=body, headers=as_alice, timeout=30)
    assert own.status_code == 200 and stolen.status_code == 404
    assert stolen.json()["reason"] == "SESSION_NOT_FOUND"
    sequence = {"text_input": "a", "max_tokens": 3, "sequence_id": 5}
    alice_token, bob_token = {"authorization": "Bearer alice-token"}, {"authorization": "Bearer bob-token"}
    url = f"{base}/v2/models/charlm/generate"
    started = requests.post(url, json={**sequence, "sequence_start": True}, headers=alice_token, timeout=30)
    bobs = requests.post(url, json=sequence, headers=bob_token, timeout=30)  # the same id is another sequence
    assert started.status_code == 200 and bobs.status_code == 404 and "sequence_start" in bobs.json()["error"]
    anonymous = requests.get(f"{base}/v1/models", timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 200  # probes need no token
    channel.close()


# -- the documented curl commands, and the OpenAPI document ---------------------------------------------------


def doc_commands() -> list[str]:
    """The curl commands of docs/http.md's shell blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    commands = [" ".join(line.rstrip("\\").strip() for line in c.split("\n")) for b in blocks for c in b.split("\n\n")]
    return [c.strip() for c in commands if c.strip().startswith("curl")]


def test_the_documented_curl_commands_work(served):
    """Each curl command of docs/http.md, run as written but for the port: a 2xx answer."""
    commands = doc_commands()
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command.replace("localhost:8000", served.http))
        done = subprocess.run([*argv, "--fail-with-body", "--silent", "--show-error", "--max-time", "60"],
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"


def test_no_generated_request_gets_a_5xx(served):
    """schemathesis over /openapi.json: every operation, a bounded number of generated requests, no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(requests.get(f"{served.base}/openapi.json", timeout=30).json())
    failures, started = [], time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def check(case):
            response = case.call(base_url=served.base, timeout=30)
            if response.status_code >= 500:
                failures.append((case.operation.label, response.status_code, response.text[:300]))

        check()
        assert time.monotonic() - started < 120, "the fuzzing is bounded in time"
    assert failures == []
