"""The Redis session store: replicas share sessions, stale copies reload, idle ones leave memory, versions are
checked, and a state that cannot be saved never becomes a session's state."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cluster
import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as redis_asyncio
from lstm.v1 import lstm_pb2 as pb
from redis.exceptions import ConnectionError as RedisConnectionError

from lstm_client import Client, InsecureTokenWarning, LstmError
from lstm_server.app import StartupError
from lstm_server.config import ANONYMOUS
from lstm_server.errors import ServiceError, Status
from lstm_server.sessions.redis_store import KEY_PREFIX, RedisSessionStore, redacted
from lstm_server.sessions.store import SessionSummary

from ..serving import STATE_KEYS, ServerThread, Stubs, array_of

PROMPT = "KING:\n"
SEED = 77


def store_settings(redis: cluster.Process, **overrides) -> dict:
    return {"session_store": "redis", "redis_url": f"redis://{redis.address}/0", "state_keys": STATE_KEYS, **overrides}


@dataclass
class StoreServers:
    """Servers of one test, sharing its private redis-server."""

    redis: cluster.Process
    start_server: Callable[..., ServerThread]

    def start(self, **overrides) -> ServerThread:
        return self.start_server(**store_settings(self.redis, **overrides))


@pytest.fixture
def stored(start_server, start_redis) -> StoreServers:
    return StoreServers(start_redis(), start_server)


def text_of(session, prompt: str = "", n: int = 12) -> str:
    return "".join(chunk.text for chunk in session.generate(prompt, max_tokens=n))


def assert_state(session, h: np.ndarray, c: np.ndarray) -> None:
    """The session's (h, c), exported, equals the reference's: the text alone barely depends on the state with
    the tests' tiny model (it is mostly the seed and the position)."""
    state = session.export()
    np.testing.assert_allclose(array_of(state.h), h, atol=1e-5)
    np.testing.assert_allclose(array_of(state.c), c, atol=1e-5)


def test_replicas_share_a_session_and_reload_stale_copies(stored, reference):
    a, b = stored.start(), stored.start()
    expected, h, c = reference.generate(PROMPT, 36, seed=SEED)
    with Client(a.address) as on_a, Client(b.address) as on_b:
        session = on_a.session(prompt=PROMPT, seed=SEED)
        first = text_of(session)
        second = text_of(on_b.attach(session.id))  # b loads it from the store
        third = text_of(session)  # a's copy is two turns old: it must reload, not reuse it
        assert first + second + third == expected
        assert_state(session, h, c)
    assert [store_events(a, "loaded"), store_events(b, "loaded")] == [1, 1]
    assert [store_events(a, "saved"), store_events(b, "saved")] == [3, 1]  # created, turns 1 and 3; turn 2


def store_events(server: ServerThread, event: str) -> float:
    registry = server.server.metrics.registry
    return registry.get_sample_value("lstm_session_store_events_total", {"event": event}) or 0


def test_idle_sessions_leave_memory_and_come_back(stored, reference):
    server = stored.start(evict_idle_s=0.2)
    expected, h, c = reference.generate(PROMPT, 24, seed=SEED)
    with Client(server.address) as client:
        session = client.session(prompt=PROMPT, seed=SEED)
        first = text_of(session)
        deadline = time.monotonic() + 10
        while client.list_sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.list_sessions() == []
        assert store_events(server, "evicted") >= 1
        assert text_of(session) == expected[len(first) :]
        assert_state(session, h, c)


def test_a_full_table_evicts_the_least_recently_used_session(stored, reference):
    server = stored.start(max_sessions=2)
    expected, h, c = reference.generate(PROMPT, 12, seed=SEED)
    with Client(server.address) as client:
        oldest = client.session(prompt=PROMPT, seed=SEED)
        client.session(prompt=PROMPT)
        client.session(prompt=PROMPT)  # the table is full: `oldest` leaves memory, its state stays in the store
        assert oldest.id not in {s.session_id for s in client.list_sessions()}
        assert text_of(oldest) == expected
        assert_state(oldest, h, c)


def test_a_fork_in_a_full_table_copies_its_source(stored, reference):
    server = stored.start(max_sessions=2)
    expected, h, c = reference.generate(PROMPT, 12, seed=SEED)
    with Client(server.address) as client:
        source = client.session(prompt=PROMPT, seed=SEED)
        assert text_of(source) == expected
        client.session(prompt=PROMPT)  # full: the fork must make room, but never by evicting its source
        fork = source.fork()
        assert_state(fork, h, c)
        assert text_of(fork) == text_of(source)


def test_a_state_written_by_another_model_version_is_refused(start_redis, repository):
    entry = repository / "charlm" / "2"
    shutil.copytree(repository / "charlm" / "1", entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    redis = start_redis()
    servers = []
    try:
        for version in (1, 2):
            servers.append(ServerThread(repository, model_versions=f"charlm={version}", **store_settings(redis)))
        with Client(servers[0].address) as v1, Client(servers[1].address, retries=0) as v2:
            session = v1.session(prompt=PROMPT)
            with pytest.raises(LstmError) as refused:
                v2.attach(session.id)
    finally:
        for server in servers:
            server.stop()
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "written by charlm version 1, but this server runs version 2" in refused.value.details


def test_closing_removes_the_session_from_the_store(stored):
    a, b = stored.start(), stored.start()
    with Client(a.address) as on_a, Client(b.address, retries=0) as on_b:
        session = on_a.session(prompt=PROMPT)
        on_b.attach(session.id)
        session.close()
        with pytest.raises(LstmError) as gone:
            on_b.attach(session.id)  # b's cached copy is not trusted over the store
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_the_store_keeps_each_sessions_tenant_and_checks_it_on_every_load(stored, tmp_path):
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
    (tmp_path / "tokens.txt").write_text("".join(f"{t} {token}\n" for t, token in tokens.items()))
    a, b = (stored.start(auth_tokens=str(tmp_path / "tokens.txt")) for _ in range(2))
    stubs = Stubs(b.address)

    def on_b(call, tenant: str, session_id: str):
        return call(
            pb.GetSessionRequest(session_id=session_id)
            if call == stubs.sessions.GetSession
            else pb.CloseSessionRequest(session_id=session_id),
            metadata=(("authorization", f"Bearer {tokens[tenant]}"),),
        )

    def code_of(call, tenant: str, session_id: str) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as failed:
            on_b(call, tenant, session_id)
        return failed.value.code()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureTokenWarning)
        with Client(a.address, token=tokens["alice"]) as alice:
            session = alice.session(prompt=PROMPT, seed=SEED)
            first = text_of(session)
    # b loads the session from Redis for whoever asks, and answers bob as if it did not exist
    assert code_of(stubs.sessions.GetSession, "bob", session.id) == grpc.StatusCode.NOT_FOUND
    assert code_of(stubs.sessions.CloseSession, "bob", session.id) == grpc.StatusCode.NOT_FOUND
    assert on_b(stubs.sessions.GetSession, "alice", session.id).tokens_seen == len(PROMPT) + len(first)
    assert code_of(stubs.sessions.GetSession, "bob", session.id) == grpc.StatusCode.NOT_FOUND  # cached on b now
    # a damaged state: its owner gets DATA_LOSS and can still close it; nobody else can
    direct = redis.Redis.from_url(f"redis://{stored.redis.address}/0")
    try:
        assert direct.hget(KEY_PREFIX + session.id, "tenant") == b"alice"
        direct.hset(KEY_PREFIX + session.id, mapping={"state": b"damaged beyond repair", "revision": 99})
    finally:
        direct.close()
    assert code_of(stubs.sessions.GetSession, "alice", session.id) == grpc.StatusCode.DATA_LOSS
    assert code_of(stubs.sessions.CloseSession, "bob", session.id) == grpc.StatusCode.NOT_FOUND
    on_b(stubs.sessions.CloseSession, "alice", session.id)
    assert code_of(stubs.sessions.GetSession, "alice", session.id) == grpc.StatusCode.NOT_FOUND
    stubs.channel.close()


def test_proposed_session_ids_are_checked(stored):
    a, b = stored.start(), stored.start()
    request = pb.CreateSessionRequest(model="charlm", prompt=PROMPT)
    proposed = "ab" * 16
    with Client(a.address) as on_a, Client(b.address) as on_b:
        for bad in ("not-hex", "AB" * 16, "ab" * 17):
            with pytest.raises(LstmError) as refused:
                on_a.call(on_a.sessions.CreateSession, request, metadata=[("x-session-id", bad)])
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "propose 32 lowercase hex digits" in refused.value.details
        made = on_a.call(on_a.sessions.CreateSession, request, metadata=[("x-session-id", proposed)])
        assert made.session_id == proposed
        for client in (on_a, on_b):  # held by a; only in the store for b
            with pytest.raises(LstmError) as taken:
                client.call(client.sessions.CreateSession, request, metadata=[("x-session-id", proposed)])
            assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_a_turn_that_cannot_be_saved_fails_and_the_session_keeps_its_last_saved_state(stored, reference):
    server = stored.start()
    store = server.server.sessions.store
    save = store.save

    async def save_after_redis_stops(*args):  # Redis goes away while the turn runs, before its save
        cluster.stop(stored.redis)
        return await save(*args)

    expected, h, c = reference.generate(PROMPT, 24, seed=SEED)
    with Client(server.address, retries=0) as client:
        session = client.session(prompt=PROMPT, seed=SEED)
        first = text_of(session)
        store.save = save_after_redis_stops
        with pytest.raises(LstmError) as failed:
            text_of(session, n=30)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "session store unavailable" in failed.value.details
        store.save = save
        redis = cluster.restart(stored.redis)
        try:
            assert text_of(session) == expected[len(first) :]  # as if the failed turn never happened
            assert session.refresh().tokens_seen == len(PROMPT) + 24
            assert_state(session, h, c)
        finally:
            cluster.stop(redis)


def test_a_save_whose_reply_is_lost_is_confirmed_not_repeated(stored, reference):
    server = stored.start()
    store = server.server.sessions.store
    script = store._save
    expected, h, c = reference.generate(PROMPT, 24, seed=SEED)

    async def applied_then_lost(*args, **kwargs):  # the write happens, its reply never arrives
        await script(*args, **kwargs)
        raise RedisConnectionError("connection reset by peer")

    async def lost_before_applied(*args, **kwargs):
        raise RedisConnectionError("connection refused")

    with Client(server.address, retries=0) as client:
        session = client.session(prompt=PROMPT, seed=SEED)
        store._save = applied_then_lost
        first = text_of(session)  # saved, though Redis's answer was lost: the turn stands
        store._save = lost_before_applied
        with pytest.raises(LstmError) as failed:
            text_of(session)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no session was changed by this call" in failed.value.details
        store._save = script
        assert first + text_of(session) == expected  # the failed turn left no trace
        assert_state(session, h, c)


def test_a_session_closed_while_it_is_created_stays_closed(stored):
    server = stored.start()
    sessions = server.server.sessions
    save = sessions.store.save

    async def close_then_save(session_id, *args):
        await sessions.close(session_id, ANONYMOUS)
        return await save(session_id, *args)

    proposed = "cd" * 16
    with Client(server.address, retries=0) as client:
        sessions.store.save = close_then_save
        with pytest.raises(LstmError) as aborted:
            request = pb.CreateSessionRequest(model="charlm", prompt=PROMPT)
            client.call(client.sessions.CreateSession, request, metadata=[("x-session-id", proposed)])
        sessions.store.save = save
        assert aborted.value.code == grpc.StatusCode.ABORTED
        assert "was closed while it was being made" in aborted.value.details
        with pytest.raises(LstmError) as gone:
            client.attach(proposed)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_the_server_waits_for_the_store_then_gives_up_clearly(exported):
    port = cluster.free_port()  # nothing listens there
    with pytest.raises(StartupError) as failure:
        ServerThread(
            exported,
            session_store="redis",
            redis_url=f"redis://127.0.0.1:{port}/0",
            store_connect_timeout_s=0.3,
            state_keys=STATE_KEYS,
        )
    assert f"session store unavailable (redis at redis://127.0.0.1:{port}/0)" in str(failure.value)


def test_replicas_of_a_redis_store_must_share_state_keys(exported):
    with pytest.raises(StartupError, match="replicas must share the keys that sign session states"):
        ServerThread(exported, session_store="redis", redis_url="redis://127.0.0.1:1/0")


def test_saves_compare_and_set_on_the_revision(start_redis):
    redis = start_redis()
    summary = SessionSummary("charlm", 1, 7, 123.0, "tenant-a")

    async def scenario():
        store = RedisSessionStore(f"redis://{redis.address}/0", ttl_s=60)
        try:
            assert await store.revision("s1", "tenant-a") is None
            assert await store.save("s1", lambda: b"one", summary, 0) == 1
            assert await store.save("s1", lambda: b"two", summary, 1) == 2
            for stale, code in ((0, Status.ALREADY_EXISTS), (1, Status.ABORTED)):
                with pytest.raises(ServiceError) as conflict:
                    await store.save("s1", lambda: b"lost", summary, stale)
                assert conflict.value.code == code
            loaded = await store.load("s1")
            assert (loaded.revision, loaded.state, loaded.created_at) == (2, b"two", 123.0)
            direct = redis_asyncio.Redis.from_url(f"redis://{redis.address}/0")  # what an operator reads
            fields = await direct.hgetall(KEY_PREFIX + "s1")
            assert fields[b"model"] == b"charlm" and fields[b"model_version"] == b"1" and fields[b"tokens_seen"] == b"7"
            assert fields[b"tenant"] == b"tenant-a"
            assert 0 < await direct.pttl(KEY_PREFIX + "s1") <= 60_000
            await direct.pexpire(KEY_PREFIX + "s1", 5_000)
            assert await store.revision("s1", "tenant-b") is None  # another tenant's: it does not exist for them
            assert await direct.pttl(KEY_PREFIX + "s1") <= 5_000  # and they did not keep it alive
            assert await store.revision("s1", "tenant-a") == 2
            assert await direct.pttl(KEY_PREFIX + "s1") > 5_000  # its owner did
            await direct.aclose()
            await store.delete("s1")
            assert await store.load("s1") is None
            with pytest.raises(ServiceError) as gone:
                await store.save("s1", lambda: b"three", summary, 2)
            assert gone.value.code == Status.NOT_FOUND
            assert "was closed (or expired) during this call" in gone.value.message
        finally:
            await store.close()

    asyncio.run(scenario())


def test_store_messages_never_show_the_password():
    assert redacted("redis://:s3cret@cache:6380/1") == "redis://:***@cache:6380/1"
    assert redacted("redis://app:s3cret@cache/0") == "redis://app:***@cache/0"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"
    assert "s3cret" not in RedisSessionStore("redis://:s3cret@127.0.0.1:1/0", ttl_s=1).url


def test_closing_a_session_while_its_turn_is_being_saved(stored):
    server = stored.start()
    sessions = server.server.sessions
    slots = server.server.models.get("charlm").engine.slots
    save = sessions.store.save

    async def close_then_save(session_id, *args):  # a CloseSession lands while the turn's save is under way
        await sessions.close(session_id, ANONYMOUS)
        return await save(session_id, *args)

    with Client(server.address, retries=0) as client:
        session = client.session(prompt=PROMPT)
        used = slots.used
        sessions.store.save = close_then_save
        assert len(text_of(session, n=8)) == 8  # the turn had completed: its text stands
        sessions.store.save = save
        with pytest.raises(LstmError) as gone:
            session.refresh()
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 5
    while slots.used != used - 1 and time.monotonic() < deadline:  # the slot is freed on the model thread
        time.sleep(0.01)
    assert slots.used == used - 1


class NaNAfter:
    """A decoder wrapper: a call from state ``poisoned`` (h0 column) gives that row a NaN state."""

    def __init__(self, inner, poisoned: np.ndarray) -> None:
        self.inner, self.name, self.sample, self.inputs = inner, inner.name, inner.sample, inner.inputs
        self.poisoned = poisoned

    def decode(self, inputs):
        out = self.inner.decode(inputs)
        hit = np.all(np.abs(inputs.h0 - self.poisoned) <= 1e-6, axis=(0, 2))
        out.h[:, hit] = np.nan
        return out


def test_a_turn_that_fails_on_its_own_row_saves_the_state_it_kept(stored):
    a, b = stored.start(max_decode_steps=1), stored.start()  # a: one character per call, so one call starts there
    with Client(a.address, retries=0) as on_a, Client(b.address, retries=0) as on_b:
        session = on_a.session(prompt=PROMPT, seed=SEED)
        text_of(session, n=6)
        fork = session.fork()  # same seed: it continues exactly as the session will
        text_of(fork, n=3)
        poisoned = array_of(fork.export().h)  # the state after 3 characters of the session's next turn
        engine = a.server.models.get("charlm").engine
        engine.wrap_decoder(lambda decoder: NaNAfter(decoder, poisoned))
        with pytest.raises(LstmError) as failed:
            text_of(session, n=8)
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        kept = session.refresh().tokens_seen
        assert kept == len(PROMPT) + 6 + 3  # the 4th character was sent, but reading it failed
        assert f"keeps its state after {kept} characters" in failed.value.details
        assert on_b.attach(session.id).info.tokens_seen == kept  # saved: every replica sees the kept state
        np.testing.assert_array_equal(array_of(on_b.attach(session.id).export().h), poisoned)


def test_a_restart_of_redis_costs_no_call(start_redis):
    """The store's connections to a Redis that restarted are retried on new ones (every kind of call): the first
    call after the restart succeeds."""
    redis_process = start_redis()
    summary = SessionSummary("charlm", 1, 7, 123.0, "tenant-a")

    restarted = []

    async def scenario():
        store = RedisSessionStore(f"redis://{redis_process.address}/0", ttl_s=60)
        try:
            assert await store.save("s1", lambda: b"one", summary, 0) == 1
            assert await store.revision("s1", "tenant-a") == 1
            cluster.stop(redis_process)
            restarted.append(cluster.restart(redis_process))  # the append-only file brings the session back
            assert await store.revision("s1", "tenant-a") == 1  # a pipeline, on a connection the old server closed
            assert (await store.load("s1")).state == b"one"
            assert await store.save("s1", lambda: b"two", summary, 1) == 2
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        for process in restarted:
            cluster.stop(process)
