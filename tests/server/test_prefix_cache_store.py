"""The prefix cache's second level in Redis, with two replicas of the shipped default entry on one redis-server: an
opening read on replica 1 is served on replica 2, bitwise; kept per tenant; bounded; a damaged entry is a miss."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import redis
from lstm.v1 import lstm_pb2 as pb

from lstm_client import InsecureTokenWarning

from ..serving import STATE_KEYS, ServerThread, Stubs

MODELS = Path(__file__).resolve().parents[2] / "models"
OPENING = (
    "You are a player in a company of actors. Answer in verse.\n\nFirst Citizen:\nBefore we proceed any further, "
    "hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
)
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture
def replicas(start_redis, tmp_path):
    """Two replicas on one redis-server, with the second level on (stride 64), and a Redis client."""
    server = start_redis()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    settings = {
        "session_store": "redis",
        "redis_url": f"redis://{server.address}/0",
        "state_keys": STATE_KEYS,
        "auth_tokens": str(tokens),
        "prefix_cache_store_ttl_s": 60,
        "prefix_cache_stride": 64,
        "prefix_cache_store_entries": 6,
    }
    warnings.simplefilter("ignore", InsecureTokenWarning)
    running = [ServerThread(MODELS, **settings), ServerThread(MODELS, **settings)]
    client = redis.Redis.from_url(settings["redis_url"])
    yield running, client
    for replica in running:
        replica.stop()


def events(replica: ServerThread, event: str) -> float:
    labels = {"model": "charlm", "event": event}
    return replica.server.metrics.registry.get_sample_value("lstm_prefix_cache_store_events_total", labels) or 0


def hits(replica: ServerThread) -> tuple[float, float]:
    registry = replica.server.metrics.registry
    return (
        registry.get_sample_value("lstm_prefix_cache_hits_total", {"model": "charlm"}),
        registry.get_sample_value("lstm_prefix_cache_saved_characters_total", {"model": "charlm"}),
    )


def read(replica: ServerThread, tenant: str, text: str, first_turn: bool = False) -> tuple[str, bytes, bytes, bytes]:
    """A new session of ``tenant`` reads ``text`` (at creation, or in its first turn), generates 8 characters
    greedily; the text and the exported state."""
    stubs = Stubs(replica.address)
    metadata = bearer(tenant)
    create = pb.CreateSessionRequest(model="charlm", prompt="" if first_turn else text)
    session = stubs.sessions.CreateSession(create, metadata=metadata)
    request = pb.GenerateRequest(
        session_id=session.session_id,
        prompt=text if first_turn else "",
        sampling=pb.SamplingParams(max_tokens=8, temperature=0.0),
    )
    generated = "".join(r.text for r in stubs.generation.Generate(request, metadata=metadata))
    state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=session.session_id), metadata=metadata)
    stubs.channel.close()
    return generated, state.h.data, state.c.data, state.next_logits.data


def written(replica: ServerThread, at_least: float) -> None:
    deadline = time.monotonic() + 10
    while events(replica, "written") < at_least:
        assert time.monotonic() < deadline, "the states never reached Redis"
        time.sleep(0.02)


def test_an_opening_read_on_one_replica_is_served_on_another(replicas) -> None:
    (one, two), client = replicas
    first = read(one, "alice", OPENING)
    written(one, 4)  # at 64, 128, 192 and the end (211)
    assert events(one, "written") == 4
    assert read(two, "alice", OPENING, first_turn=True) == first  # bitwise: text, h, c, logits
    assert events(two, "hit") == 1 and hits(two) == (1, len(OPENING))
    again = read(two, "alice", OPENING[:150] + "\nAll:\nNo more talking on't.\n")
    assert events(two, "hit") == 2 and hits(two)[1] == len(OPENING) + 128  # the state at 128, from Redis
    assert again == read(one, "alice", OPENING[:150] + "\nAll:\nNo more talking on't.\n")
    assert read(two, "bob", OPENING)[1:] == first[1:]  # bob's read is his own: no entry of alice's serves it
    assert events(two, "miss") == 1 and hits(two)[0] == 2
    assert client.zcard("lstm:prefix:charlm:2:index") <= 6
    assert len(list(client.scan_iter("lstm:prefix:charlm:2:state:*"))) <= 6


def test_a_damaged_entry_is_a_miss(replicas) -> None:
    (one, two), client = replicas
    first = read(one, "alice", OPENING)
    written(one, 4)
    for key in client.scan_iter("lstm:prefix:charlm:2:state:*"):
        client.set(key, b"not a signed state")
    assert read(two, "alice", OPENING) == first
    assert events(two, "failed") == 1 and events(two, "hit") == 0 and hits(two)[0] == 0


def test_clearing_a_tenants_entries_clears_them_in_redis_too(replicas) -> None:
    (one, two), client = replicas
    read(one, "bob", OPENING)
    written(one, 4)
    read(one, "alice", OPENING)
    written(one, 8)  # 6 kept at most: two of bob's went
    stubs = Stubs(two.address)
    request = pb.ClearPrefixCacheRequest(model="charlm")
    cleared = stubs.models.ClearPrefixCache(request, metadata=bearer("alice"))
    assert (cleared.cleared, cleared.cleared_store) == (0, 4)  # replica 2 held none of alice's; Redis held 4
    assert len(list(client.scan_iter("lstm:prefix:charlm:2:state:*"))) == 2
    read(two, "alice", OPENING)
    assert events(two, "miss") == 1 and hits(two) == (0, 0)
    read(two, "bob", OPENING)  # bob's are still there
    assert events(two, "hit") == 1 and hits(two)[0] == 1
    stubs.channel.close()
