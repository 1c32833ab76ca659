"""The exact prefix state cache of one model version: states after the openings it has read, by their text.

A radix tree over characters per scope (a tenant, or every tenant of a model that shares its cache) whose nodes
hold checkpoints: the state (logits, h, c) after the text from the root to the node. The prefill thread writes one
at the end of every opening it reads into a fresh state and one every ``stride`` characters along it; ``lookup``
gives the longest prefix of a text that has one, so only the rest is read. Reading a text in parts with the state
carried is bitwise reading it at once (every entry's export checks it), so a hit gives exactly what a miss gives.

Bounded by ``max_bytes`` (the checkpoints' arrays, their nodes and the text the tree holds; 0: off), the least
recently used checkpoint evicted first. Owned by the model's prefill thread: nothing else calls it (the event loop
reaches it through jobs posted to that thread), so it has no lock; only ``max_bytes`` and ``stride``, fixed when it is
made, are read elsewhere.
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# A read leaves a state where it left the tree's texts only this far past where it started: one nearer would save
# the next read less than the extra model call costs this one.
DIVERGED_GAIN = 32
NODE_BYTES = 232  # a node's object, its slots and its dicts' share, counted with each node (measured, CPython 3.12)


class Hit(NamedTuple):
    """A lookup's answer: the longest cached prefix (``found`` characters, ``state`` after them; 0 and None if
    none), and how many characters the text shares with the texts the tree holds (``diverged``)."""

    found: int
    state: CachedState | None
    diverged: int


class CachedState(NamedTuple):
    """A checkpoint's state: ``logits`` [1, vocab], ``h`` and ``c`` [layers x directions, 1, hidden]."""

    logits: np.ndarray
    h: np.ndarray
    c: np.ndarray


@dataclass(frozen=True)
class CacheEntry:
    """One checkpoint, as ``entries`` lists it: the characters it stands after, the ids of their first
    ``PREVIEW``."""

    scope: str
    characters: int
    preview: tuple[int, ...]
    bytes: int
    hits: int
    idle_s: float


PREVIEW = 64


class _Node:
    __slots__ = ("bytes", "children", "hits", "label", "parent", "state", "used_at")

    def __init__(self, label: str, parent: _Node | None) -> None:
        self.label = label  # the characters on the edge from the parent (a root's: its scope)
        self.parent = parent
        self.children: dict[str, _Node] = {}  # by the first character of their label
        self.state: CachedState | None = None
        self.bytes = 0  # the state's arrays
        self.hits = 0
        self.used_at = 0.0


def as_key(tokens: np.ndarray) -> str:
    """Token ids as a string, one code point each (ids of a character vocabulary are far below the surrogates)."""
    return np.ascontiguousarray(tokens, "<u4").tobytes().decode("utf-32-le")


def _ids(key: str) -> tuple[int, ...]:
    return tuple(map(ord, key))


def _node_bytes(label: str) -> int:
    return NODE_BYTES + sys.getsizeof(label)


class PrefixCache:
    """The checkpoints of one model version, per scope; at most ``max_bytes`` (0: off, nothing kept)."""

    def __init__(self, max_bytes: int, stride: int) -> None:
        self.max_bytes = max_bytes
        self.stride = stride  # a checkpoint every this many characters along an opening (0: only at its end)
        self.bytes = 0
        self.evictions = 0  # checkpoints evicted to stay within max_bytes, ever
        self._roots: dict[str, _Node] = {}
        self._lru: collections.OrderedDict[_Node, None] = collections.OrderedDict()  # checkpointed nodes, oldest first

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, scope: str, tokens: np.ndarray) -> Hit:
        """The longest prefix of ``tokens`` with a checkpoint in ``scope``, and where ``tokens`` leaves the texts
        the tree holds."""
        node = self._roots.get(scope)
        key = as_key(tokens)
        found, best, at = 0, None, 0
        while node is not None and at < len(key):
            node = node.children.get(key[at])
            if node is None:
                break
            common = _common(node.label, key, at)
            at += common
            if common < len(node.label):
                break
            if node.state is not None:
                found, best = at, node
        if best is None:
            return Hit(0, None, at)
        best.hits += 1
        self._touch(best)
        return Hit(found, best.state, at)

    def cuts(self, start: int, end: int, diverged: int = 0) -> list[int]:
        """Where a read of characters ``start`` to ``end`` of an opening leaves checkpoints (absolute positions):
        every multiple of ``stride`` after ``start``, where it left the texts the tree holds (``diverged``: the
        next text that shares as much with it finds a state there), and ``end``."""
        if not self.enabled or end <= start:
            return []
        inner = set(range((start // self.stride + 1) * self.stride, end, self.stride) if self.stride else ())
        if start + DIVERGED_GAIN <= diverged < end:
            inner.add(diverged)
        return [*sorted(inner), end]

    def insert(self, scope: str, tokens: np.ndarray, state: CachedState) -> None:
        """Keep ``state``, the state after ``tokens`` (copied), in ``scope``; then evict down to ``max_bytes``."""
        if not self.enabled or not len(tokens):
            return
        node = self._place(scope, as_key(tokens))
        if node.state is None:
            node.state = CachedState(*(np.array(a, np.float32, copy=True) for a in state))
            node.bytes = sum(a.nbytes for a in node.state)
            self.bytes += node.bytes
        self._touch(node)
        while self.bytes > self.max_bytes and self._lru:
            self._drop(next(iter(self._lru)))
            self.evictions += 1

    def entries(self, scope: str, limit: int) -> list[CacheEntry]:
        """The checkpoints of ``scope``, shortest text first, at most ``limit``."""
        now = time.monotonic()
        found: list[CacheEntry] = []
        root = self._roots.get(scope)
        stack = [(child, 0, "") for child in root.children.values()] if root is not None else []
        while stack:
            node, before, preview = stack.pop()
            length, preview = before + len(node.label), (preview + node.label[:PREVIEW])[:PREVIEW]
            if node.state is not None:
                found.append(CacheEntry(scope, length, _ids(preview), node.bytes, node.hits, now - node.used_at))
            stack.extend((child, length, preview) for child in node.children.values())
        return sorted(found, key=lambda e: (e.characters, e.preview))[:limit]

    def clear(self, scope: str) -> int:
        """Forget every checkpoint of ``scope``; how many there were."""
        root = self._roots.pop(scope, None)
        if root is None:
            return 0
        cleared, stack = 0, [root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.state is not None:
                cleared += 1
                del self._lru[node]
                self.bytes -= node.bytes
            self.bytes -= _node_bytes(node.label)
        return cleared

    # -- the tree ----------------------------------------------------------------------

    def _touch(self, node: _Node) -> None:
        node.used_at = time.monotonic()
        self._lru[node] = None
        self._lru.move_to_end(node)

    def _new(self, label: str, parent: _Node | None) -> _Node:
        self.bytes += _node_bytes(label)
        return _Node(label, parent)

    def _relabel(self, node: _Node, label: str) -> None:
        self.bytes += sys.getsizeof(label) - sys.getsizeof(node.label)
        node.label = label

    def _place(self, scope: str, key: str) -> _Node:
        """The node of ``key`` in ``scope``, made (splitting an edge) if there is none."""
        node = self._roots.get(scope)
        if node is None:
            node = self._roots[scope] = self._new(scope, None)  # a root's label: its scope
        at = 0
        while at < len(key):
            child = node.children.get(key[at])
            if child is None:
                node.children[key[at]] = node = self._new(key[at:], node)
                return node
            common = _common(child.label, key, at)
            if common < len(child.label):  # split the edge: a node where the key leaves it (or ends)
                middle = self._new(child.label[:common], node)
                node.children[key[at]] = middle
                self._relabel(child, child.label[common:])
                child.parent = middle
                middle.children[child.label[0]] = child
                child = middle
            at += common
            node = child
        return node

    def _drop(self, node: _Node) -> None:
        """Forget ``node``'s checkpoint and the nodes that no longer lead to one."""
        del self._lru[node]
        self.bytes -= node.bytes
        node.state, node.bytes = None, 0
        while node.parent is not None and node.state is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:  # one child: it takes this node's place
                (child,) = node.children.values()
                self._relabel(child, node.label + child.label)
                child.parent = parent
                parent.children[node.label[0]] = child
            else:
                del parent.children[node.label[0]]
            self.bytes -= _node_bytes(node.label)
            node = parent
        if node.parent is None and not node.children:  # an empty scope
            del self._roots[node.label]
            self.bytes -= _node_bytes(node.label)


def _common(label: str, key: str, at: int) -> int:
    """How many characters ``label`` and ``key[at:]`` share at their start (string compares in C: a whole edge
    at once, else a binary search)."""
    if key.startswith(label, at):
        return len(label)
    low, high = 0, min(len(label), len(key) - at)
    while low < high:
        middle = (low + high + 1) // 2
        if key.startswith(label[:middle], at):
            low = middle
        else:
            high = middle - 1
    return low
