"""The prefix cache as served, on the shipped entries under models/ (the default configuration included).

A read into a fresh state that finds a cached prefix gives bitwise what a server without the cache gives: the
generated text, the exported h, c and next-character logits, Step's state and probabilities; over random openings,
split points and checkpoint strides, alone and beside concurrent neighbours. A tenant never hits another tenant's
entries unless the model's cache is shared; the admin calls list and clear the caller's own entries only.
"""

from __future__ import annotations

import random
import threading
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
from lstm.v1 import lstm_pb2 as pb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lstm_client import InsecureTokenWarning
from lstm_server import tracing
from lstm_server.config import ServerConfig
from lstm_server.runtime.model_repository import list_entries

from ..serving import ServerThread, Stubs, array_of

MODELS = Path(__file__).resolve().parents[2] / "models"
ENTRIES = list_entries(MODELS)
BASE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\nFirst Citizen:\nFirst, "
    "you know Caius Marcius is chief enemy to the people.\n\nAll:\nWe know't, we know't.\n\nFirst Citizen:\n"
    "Let us kill him, and we'll have corn at our own price.\nIs't a verdict?\n"
)
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
CHARS = 12


def counter(running: ServerThread, name: str) -> float:
    return running.server.metrics.registry.get_sample_value(f"lstm_prefix_cache_{name}_total", {"model": "charlm"})


def openings(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    """Texts that share openings of random lengths with each other (and a few that share nothing)."""
    texts = []
    for _ in range(n):
        shared = BASE[: rng.randint(1, len(BASE))]
        tail = "".join(rng.choice(vocab) for _ in range(rng.randint(0, 40)))
        texts.append(shared + tail if rng.random() < 0.8 else tail or "x")
    return texts


def serve(stubs: Stubs, kind: str, text: str, seed: int, metadata=()) -> tuple:
    """What a fresh read of ``text`` gives by one path: the text generated and the state's bytes."""
    sampling = pb.SamplingParams(max_tokens=CHARS, temperature=0.0 if seed % 2 else 0.8, seed=seed)
    if kind == "step":
        out = stubs.generation.Step(pb.StepRequest(model="charlm", text=text), metadata=metadata)
        return "", out.h.data, out.c.data, np.array(out.probabilities, np.float32).tobytes()
    prompt = text if kind == "create" else ""
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=prompt), metadata=metadata)
    first = "" if kind == "create" else text  # "turn": the new session's first Generate reads it
    request = pb.GenerateRequest(session_id=session.session_id, prompt=first, sampling=sampling)
    generated = "".join(r.text for r in stubs.generation.Generate(request, metadata=metadata))
    state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=session.session_id), metadata=metadata)
    stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), metadata=metadata)
    return generated, state.h.data, state.c.data, array_of(state.next_logits).tobytes()


@pytest.mark.parametrize(
    ("version", "stride"), [(v, stride) for v in ENTRIES.get("charlm", []) for stride in ((0, 37) if v > 1 else (23,))]
)
def test_a_hit_gives_bitwise_what_a_miss_gives(version, stride) -> None:
    rng = random.Random(version * 100 + stride)
    cached = ServerThread(MODELS, model_versions=f"charlm={version}", prefix_cache_stride=stride)
    plain = ServerThread(MODELS, model_versions=f"charlm={version}", prefix_cache_bytes=0)
    try:
        on, off = Stubs(cached.address), Stubs(plain.address)
        vocab = [ch for ch in on.models.DescribeModel(pb.DescribeModelRequest(model="charlm")).vocabulary if ch]
        jobs = [(rng.choice(["create", "turn", "step"]), text, i) for i, text in enumerate(openings(rng, vocab, 10))]
        for kind, text, seed in jobs:  # one after another: each finds what the ones before left
            assert serve(on, kind, text, seed) == serve(off, kind, text, seed), (kind, len(text))
        together: list = [None] * len(jobs)  # beside neighbours: read and drawn in shared calls

        def run(i: int) -> None:
            start.wait()
            together[i] = serve(on, *jobs[i])

        start = threading.Barrier(len(jobs))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert together == [serve(off, *job) for job in jobs]
        assert counter(cached, "hits") >= len(jobs), "the cached server hit too little to test anything"
        assert counter(cached, "saved_characters") > 0
        assert counter(plain, "lookups") == 0
    finally:
        cached.stop()
        plain.stop()


def test_a_continuing_session_does_not_look_up() -> None:
    running = ServerThread(MODELS)
    try:
        stubs = Stubs(running.address)
        session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=BASE[:50]))
        looked = counter(running, "lookups")
        request = pb.GenerateRequest(session_id=session.session_id, prompt=BASE[:50], sampling={"max_tokens": 2})
        list(stubs.generation.Generate(request))
        assert counter(running, "lookups") == looked == 1
    finally:
        running.stop()


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def entries(stubs: Stubs, tenant: str) -> list[pb.PrefixCacheEntry]:
    request = pb.ListPrefixCacheRequest(model="charlm")
    return list(stubs.models.ListPrefixCache(request, metadata=bearer(tenant)).entries)


@pytest.fixture
def tokens_file(tmp_path) -> str:
    path = tmp_path / "tokens.txt"
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    return str(path)


def test_one_tenant_never_hits_another_tenants_opening(tokens_file) -> None:
    running = ServerThread(MODELS, auth_tokens=tokens_file, prefix_cache_stride=100)
    warnings.simplefilter("ignore", InsecureTokenWarning)
    try:
        stubs = Stubs(running.address)
        alice = serve(stubs, "create", BASE, 1, bearer("alice"))
        assert [e.characters for e in entries(stubs, "alice")] == [100, 200, 300, len(BASE)]
        assert entries(stubs, "alice")[-1].preview == BASE[:64]
        for kind in ("create", "turn", "step"):  # every fresh read of bob's misses alice's entries
            serve(stubs, kind, BASE, 1, bearer("bob"))
        assert counter(running, "hits") == 2  # bob's second and third reads hit bob's own first one
        assert serve(stubs, "create", BASE, 1, bearer("bob")) == alice
        assert len(entries(stubs, "bob")) == 4
        bob_cleared = stubs.models.ClearPrefixCache(pb.ClearPrefixCacheRequest(model="charlm"), metadata=bearer("bob"))
        assert bob_cleared.cleared == 4 and entries(stubs, "bob") == [] and len(entries(stubs, "alice")) == 4
        hits = counter(running, "hits")
        serve(stubs, "create", BASE[:150], 2, bearer("bob"))  # alice's entry after 100 characters is not bob's
        assert counter(running, "hits") == hits
        serve(stubs, "create", BASE[:150], 2, bearer("alice"))
        assert counter(running, "hits") == hits + 1
        with pytest.raises(grpc.RpcError) as refused:  # a classifier has no prefix cache
            stubs.models.ListPrefixCache(pb.ListPrefixCacheRequest(model="sentiment"), metadata=bearer("alice"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop()


def test_a_shared_model_serves_every_tenant_from_one_cache(tokens_file) -> None:
    running = ServerThread(MODELS, auth_tokens=tokens_file, prefix_cache_shared="charlm")
    warnings.simplefilter("ignore", InsecureTokenWarning)
    try:
        stubs = Stubs(running.address)
        alice = serve(stubs, "create", BASE, 3, bearer("alice"))
        assert serve(stubs, "turn", BASE, 3, bearer("bob")) == alice
        assert counter(running, "hits") == 1 and counter(running, "saved_characters") == len(BASE)
        assert entries(stubs, "alice") == entries(stubs, "bob") == []  # shared entries are no tenant's own
    finally:
        running.stop()


def test_each_fresh_read_has_a_lookup_span() -> None:
    exporter = InMemorySpanExporter()
    tracing.setup_tracing(ServerConfig(), exporter)
    running = ServerThread(MODELS)
    try:
        stubs = Stubs(running.address)
        serve(stubs, "create", BASE[:120], 1)  # a miss
        serve(stubs, "turn", BASE[:150], 1)  # a new session's first turn: a hit of 120 characters
        lookups = [s for s in exporter.get_finished_spans() if s.name == "lstm.prefix_cache.lookup"]
        assert [s.attributes["lstm.cached_characters"] for s in lookups] == [0, 120]
        parents = {s.context.span_id: s.name for s in exporter.get_finished_spans()}
        assert [parents[s.parent.span_id] for s in lookups] == ["lstm.prefill", "lstm.v1.Generation/Generate"]
    finally:
        running.stop()
        tracing.setup_tracing(ServerConfig())  # off again
