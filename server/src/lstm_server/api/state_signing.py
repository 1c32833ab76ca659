"""Exported session states are signed by the server, so a client can keep its state but cannot forge one.

A ``SessionState`` carries an HMAC-SHA256 (RFC 2104) over a canonical encoding of every other field, made with
one of the server's state keys and naming it (``key_id``). The first key signs; every listed key is accepted,
so keys rotate by putting a new key first and dropping the old one once no state signed with it matters.

The encoding is this project's own and does not depend on protobuf's serializer (which promises no canonical
form across versions): a version tag, then each field as an 8-byte little-endian length and its bytes; tensors
as their shape and their raw little-endian float32 bytes; sampling defaults as sorted JSON.

Keys come from ``state_keys_file`` ("KEY_ID SECRET" lines, ``#`` comments) or ``state_keys``
("id1:secret1,id2:secret2", e.g. from LSTM_SERVER_STATE_KEYS). Without either, a server with the memory store
makes a random key at start: its states are valid until it stops. Replicas that share a session store must
share keys, so the Redis store refuses to start without them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path

from lstm.v1 import lstm_pb2 as pb

log = logging.getLogger(__name__)
ENCODING_TAG = b"lstm-session-state/2"
MIN_SECRET_BYTES = 16


class StateKeyError(ValueError):
    """The configured state keys cannot be used; the message says why."""


def _parse(pairs: Iterable[tuple[str, str]], where: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for key_id, secret in pairs:
        if not key_id or not secret:
            raise StateKeyError(f"{where}: every key needs an id and a secret")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise StateKeyError(
                f"{where}: key {key_id!r} is shorter than {MIN_SECRET_BYTES} bytes; use e.g. "
                "`python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        if key_id in keys:
            raise StateKeyError(f"{where}: key id {key_id!r} appears twice")
        keys[key_id] = secret.encode()
    return keys


class StateSigner:
    """Signs and checks exported session states with an ordered set of keys (the first signs)."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise StateKeyError("no state keys")
        self.keys = keys
        self.signing_id = next(iter(keys))

    @classmethod
    def from_settings(cls, keys_file: str, inline: str, required: bool) -> StateSigner:
        """The configured keys; a random process-local key if none are configured and ``required`` is false."""
        if keys_file:
            try:
                lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise StateKeyError(f"--state-keys-file {keys_file}: cannot be read ({error.strerror})") from error
            pairs = [line.split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if any(len(pair) != 2 for pair in pairs):
                raise StateKeyError(f"--state-keys-file {keys_file}: each line must be 'KEY_ID SECRET'")
            return cls(_parse(((i, s.strip()) for i, s in pairs), f"--state-keys-file {keys_file}"))
        if inline:
            items = [item.strip().partition(":") for item in inline.split(",") if item.strip()]
            return cls(_parse(((i, s) for i, _, s in items), "--state-keys (LSTM_SERVER_STATE_KEYS)"))
        if required:
            raise StateKeyError(
                "--session-store redis: replicas must share the keys that sign session states; give "
                "--state-keys-file FILE or LSTM_SERVER_STATE_KEYS"
            )
        log.warning("no state keys configured: exported states are valid only until this server stops")
        return cls({"ephemeral-" + secrets.token_hex(4): secrets.token_bytes(32)})

    def _mac(self, key: bytes, state: pb.SessionState) -> bytes:
        return hmac.new(key, canonical_bytes(state), hashlib.sha256).digest()

    def sign(self, state: pb.SessionState) -> pb.SessionState:
        """Set ``key_id`` and ``mac`` (in place) and return the state."""
        state.key_id = self.signing_id
        state.mac = self._mac(self.keys[self.signing_id], state)
        return state

    def verify(self, state: pb.SessionState) -> str:
        """ "" if the state's MAC is right, else what is wrong with it (for the caller's error message)."""
        key = self.keys.get(state.key_id)
        if key is None:
            return (
                f"it was signed with key {state.key_id[:64]!r}, which this server does not hold (a state from "
                "another deployment, or from before a key rotation)"
            )
        if not hmac.compare_digest(self._mac(key, state), state.mac):
            return "its signature does not match: it was altered, truncated or forged"
        return ""


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _tensor(tensor: pb.Tensor) -> bytes:
    return _field(struct.pack(f"<{len(tensor.shape)}q", *tensor.shape)) + _field(tensor.data)


def canonical_bytes(state: pb.SessionState) -> bytes:
    """Every field of ``state`` but ``mac``, in the encoding the MAC covers."""
    defaults = {f.name: v for f, v in state.defaults.ListFields()}
    if "stop" in defaults:
        defaults["stop"] = list(defaults["stop"])
    parts = [
        _field(ENCODING_TAG),
        _field(state.model.encode()),
        _field(struct.pack("<iQ", state.model_version, state.tokens_seen)),
        _field(state.tenant.encode()),
        _field(state.key_id.encode()),
        _tensor(state.h),
        _tensor(state.c),
        _tensor(state.next_logits),
        _field(json.dumps(defaults, sort_keys=True).encode()),
    ]
    return b"".join(parts)
