"""The prefix cache's radix tree (engine/prefix_cache.py) against a plain reference: every key it holds, the longest
held prefix for a lookup, its byte bound and least-recently-used eviction, its scopes kept apart."""

from __future__ import annotations

import itertools
import random

import numpy as np

from lstm_server.engine.prefix_cache import CachedState, PrefixCache


def state(tag: float) -> CachedState:
    return CachedState(np.full((1, 5), tag, np.float32), np.full((2, 1, 3), tag, np.float32), np.zeros((2, 1, 3)))


def tokens(text: str) -> np.ndarray:
    return np.array([ord(ch) - ord("a") for ch in text], np.int64)


def held(cache: PrefixCache, scope: str) -> set[str]:
    """The openings ``scope`` holds checkpoints after."""
    return {"".join(chr(i + ord("a")) for i in entry.preview) for entry in cache.entries(scope, 1 << 20)}


def shared(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at their start."""
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False)))


def test_random_inserts_and_lookups_match_a_plain_reference() -> None:
    rng = random.Random(7)
    cache = PrefixCache(max_bytes=40_000, stride=4)
    inserted: dict[tuple[str, str], float] = {}  # every key inserted, and the tag of the state it holds
    for i in range(1500):
        scope = rng.choice(["tenant:a", "tenant:b"])
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 14)))  # a small alphabet: shared prefixes
        if rng.random() < 0.5:
            if text not in held(cache, scope):  # a key held keeps its state (the same state, when served)
                inserted[scope, text] = float(i)
            cache.insert(scope, tokens(text), state(float(i)))
            assert cache.bytes <= cache.max_bytes
            continue
        kept = held(cache, scope)
        found, got, diverged = cache.lookup(scope, tokens(text))
        assert diverged == max((shared(text, k) for k in kept), default=0)
        expected = max((len(k) for k in kept if text.startswith(k)), default=0)
        assert found == expected, (scope, text, kept)
        if found:
            assert got.logits[0, 0] == inserted[scope, text[:found]]
        else:
            assert got is None
    assert cache.evictions > 0, "the bound was never reached: the test did not test eviction"
    assert len(cache) == len(cache.entries("tenant:a", 1 << 20)) + len(cache.entries("tenant:b", 1 << 20))
    assert cache.clear("tenant:a") + cache.clear("tenant:b") > 0
    assert cache.bytes == 0 and len(cache) == 0  # every byte counted in was counted out


def test_the_least_recently_used_checkpoint_goes_first() -> None:
    sizing = PrefixCache(max_bytes=1 << 30, stride=0)
    sizing.insert("s", tokens("abc"), state(1))
    first = sizing.bytes  # the scope's root, and a checkpoint with its node and text
    sizing.insert("s", tokens("xyz"), state(1))
    each = sizing.bytes - first
    cache = PrefixCache(max_bytes=first + 2 * each + each // 2, stride=0)  # room for three
    for text in ("aaa", "bbb", "ccc"):
        cache.insert("s", tokens(text), state(1))
    assert cache.lookup("s", tokens("aaab"))[0] == 3  # "aaa" used: "bbb" is now the oldest
    cache.insert("s", tokens("ddd"), state(1))
    assert held(cache, "s") == {"aaa", "ccc", "ddd"}
    assert cache.evictions == 1


def test_scopes_do_not_see_each_other() -> None:
    cache = PrefixCache(max_bytes=1 << 20, stride=0)
    cache.insert("tenant:a", tokens("abab"), state(1))
    assert cache.lookup("tenant:b", tokens("ababab")) == (0, None, 0)
    assert cache.entries("tenant:b", 10) == [] and cache.clear("tenant:b") == 0
    assert cache.lookup("tenant:a", tokens("ababab"))[0] == 4


def test_split_edges_keep_both_branches_and_their_states() -> None:
    cache = PrefixCache(max_bytes=1 << 20, stride=0)
    cache.insert("s", tokens("abcdef"), state(1))
    cache.insert("s", tokens("abcxyz"), state(2))  # splits the edge after "abc"
    cache.insert("s", tokens("ab"), state(3))  # a checkpoint inside the shared edge
    assert cache.lookup("s", tokens("abcdefg"))[1].logits[0, 0] == 1
    assert cache.lookup("s", tokens("abcxyzz"))[1].logits[0, 0] == 2
    assert cache.lookup("s", tokens("abcq"))[1].logits[0, 0] == 3
    assert cache.lookup("s", tokens("a")) == (0, None, 1)
    assert cache.lookup("s", tokens("abcdxx")).diverged == 4  # inside the edge "def": a read may leave a state there
    assert [e.characters for e in cache.entries("s", 10)] == [2, 6, 6]
    assert [e.characters for e in cache.entries("s", 2)] == [2, 6]


def test_cuts_every_stride_after_the_start_and_at_the_end() -> None:
    assert PrefixCache(1, 4).cuts(0, 10) == [4, 8, 10]
    assert PrefixCache(1, 4).cuts(5, 8) == [8]
    assert PrefixCache(1, 4).cuts(4, 13) == [8, 12, 13]
    assert PrefixCache(1, 0).cuts(3, 9) == [9]
    assert PrefixCache(1, 4).cuts(2, 50, diverged=37) == [4, 8, 12, 16, 20, 24, 28, 32, 36, 37, 40, 44, 48, 50]
    assert PrefixCache(1, 0).cuts(6, 50, diverged=40) == [40, 50]
    assert PrefixCache(1, 0).cuts(6, 50, diverged=20) == [50]  # too near the start: not worth a call
    assert PrefixCache(0, 4).cuts(0, 10) == []  # off
