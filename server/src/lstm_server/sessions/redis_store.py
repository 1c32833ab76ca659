"""The Redis session store: a session's state beyond this process, shared by replicas.

Every session is a Redis hash ``lstm:session:<id>`` holding its serialized state (a signed
``SessionState`` message), a ``revision`` that grows by one at every save,
the tenant that owns it (checked on every load, and by close, which works
even when the state is damaged), the model's name and version and the token
count (so an operator can read them with ``redis-cli HGETALL``), and its
creation time. Passwords (``redis://:PASSWORD@host``) and TLS (``rediss://``)
work as redis-py reads them from the URL.
The key expires after the server's idle timeout, refreshed at every save.

Saves are compare-and-set on the revision (one Lua script, atomic in Redis):
a replica writes only over the revision it read, so two replicas can never
interleave turns of one session unnoticed. Any failure to reach Redis is
UNAVAILABLE with a message that names the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry  # the asyncio one: the sync Retry never awaits, so never retries
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from ..errors import RETRY_AFTER_S, ServiceError, Status
from ..metrics import Metrics
from .store import SessionSummary, StoredSession

log = logging.getLogger(__name__)
KEY_PREFIX = "lstm:session:"

# KEYS[1]: the session; ARGV: expected revision, state, model, model_version, tokens_seen, created_at, ttl (ms),
# a token unique to this save, and the tenant. Returns the new revision; if this very save was applied already
# (a retry after a lost reply), its revision again; -1 if the stored revision is another; -2 if the session is gone.
# KEYS[1]: the session; ARGV: the caller's tenant, ttl (ms). The stored revision if the tenant owns the session,
# whose expiry it then refreshes; nothing otherwise (no such session, or another tenant's: neither is touched).
_OWNED_REVISION = """
local stored = redis.call('HMGET', KEYS[1], 'revision', 'tenant')
if not stored[1] or stored[2] ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return stored[1]
"""

_COMPARE_AND_SAVE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
local expected = tonumber(ARGV[1])
if current == expected + 1 and redis.call('HGET', KEYS[1], 'token') == ARGV[8] then return current end
if current ~= expected then
  if current == 0 then return -2 end
  return -1
end
local created = redis.call('HGET', KEYS[1], 'created_at') or ARGV[6]
redis.call('HSET', KEYS[1], 'revision', current + 1, 'state', ARGV[2], 'model', ARGV[3],
           'model_version', ARGV[4], 'tokens_seen', ARGV[5], 'created_at', created, 'token', ARGV[8],
           'tenant', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return current + 1
"""


class RedisSessionStore:
    """Session states in Redis (``redis://host:port/db``); counts the states it saves in ``metrics``."""

    durable = True

    def __init__(self, url: str, ttl_s: float, metrics: Metrics | None = None, timeout_s: float = 2.0) -> None:
        self.url = redacted(url)  # for messages and logs: never the password
        self._saved = (metrics or Metrics()).store_events.labels("saved")
        self.ttl_ms = max(1, int(ttl_s * 1000))
        # A stopped Redis refuses connections at once: two quick retries, then UNAVAILABLE to the caller.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        self._save = self._redis.register_script(_COMPARE_AND_SAVE)
        self._owned_revision = self._redis.register_script(_OWNED_REVISION)

    def _unavailable(self, error: Exception, outcome: str = "no session was changed by this call") -> ServiceError:
        return ServiceError(
            Status.UNAVAILABLE,
            f"session store unavailable (redis at {self.url}): {error}; {outcome}, retry when the store is back",
            reason="STORE_UNAVAILABLE",
            retry_after_s=RETRY_AFTER_S,
        )

    async def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            try:
                await self._redis.ping()
                return
            except RedisError as error:
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(error) from error
                log.warning("waiting for the session store", extra={"store": self.url, "error": str(error)})
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def revision(self, session_id: str, tenant: str) -> int | None:
        """The stored revision if ``tenant`` owns the session (None: no such session, or another tenant's);
        every call on a session asks, and so keeps it alive for another idle timeout, reads included, but only
        for its owner."""
        try:
            value = await self._owned_revision(keys=[KEY_PREFIX + session_id], args=[tenant, self.ttl_ms])
        except RedisError as error:
            raise self._unavailable(error) from error
        return None if value is None else int(value)

    async def load(self, session_id: str) -> StoredSession | None:
        try:
            revision, state, created_at, tenant = await self._redis.hmget(
                KEY_PREFIX + session_id, "revision", "state", "created_at", "tenant"
            )
        except RedisError as error:
            raise self._unavailable(error) from error
        if revision is None or state is None:
            return None
        return StoredSession(int(revision), state, float(created_at or 0.0), (tenant or b"").decode())

    async def tenant(self, session_id: str) -> str | None:
        try:
            tenant = await self._redis.hget(KEY_PREFIX + session_id, "tenant")
        except RedisError as error:
            raise self._unavailable(error) from error
        return None if tenant is None else tenant.decode()

    async def save(
        self, session_id: str, state: Callable[[], bytes], summary: SessionSummary, expected_revision: int
    ) -> int:
        revision = await self._compare_and_save(session_id, state(), summary, expected_revision)
        self._saved.inc()
        return revision

    async def _compare_and_save(
        self, session_id: str, state: bytes, summary: SessionSummary, expected_revision: int
    ) -> int:
        key = KEY_PREFIX + session_id
        token = secrets.token_hex(8)
        args = [
            expected_revision,
            state,
            summary.model,
            summary.model_version,
            summary.tokens_seen,
            repr(summary.created_at),
            self.ttl_ms,
            token,
            summary.tenant,
        ]
        try:
            revision = int(await self._save(keys=[key], args=args))
        except RedisError as error:  # the write may have happened (a timeout, a lost reply): ask before answering
            try:
                stored_revision, stored_token = await self._redis.hmget(key, "revision", "token")
            except RedisError:
                raise self._unavailable(
                    error, "this turn may or may not have been saved (GetSession's tokens_seen tells)"
                ) from error
            if stored_token is not None and stored_token.decode() == token:
                return int(stored_revision)
            raise self._unavailable(error) from error
        if revision == -2 and expected_revision:
            raise ServiceError(
                Status.NOT_FOUND,
                f"session {session_id} was closed (or expired) during this call; create a new one",
                reason="SESSION_CLOSED",
            )
        if revision < 0:
            if expected_revision == 0:
                raise ServiceError(
                    Status.ALREADY_EXISTS,
                    f"session {session_id} already exists; create it with another id",
                    reason="SESSION_EXISTS",
                )
            raise ServiceError(
                Status.ABORTED,
                f"session {session_id} was changed by another replica during this call; this call's change was "
                "discarded: retry it",
                reason="SESSION_CHANGED",
                retry_after_s=0.0,
            )
        return revision

    async def delete(self, session_id: str) -> None:
        try:
            await self._redis.delete(KEY_PREFIX + session_id)
        except RedisError as error:
            raise self._unavailable(error) from error

    async def close(self) -> None:
        await self._redis.aclose()


def redacted(url: str) -> str:
    """``url`` with the password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


PREFIX_KEY = "lstm:prefix:"

# KEYS[1]: the entry, KEYS[2]: its model version's index (a sorted set of entries by time written), KEYS[3]: its
# scope's set of entries; ARGV: the signed state, ttl (ms), now (ms), the most entries of the index. Writes the
# entry, forgets the index's entries older than the ttl, and deletes the oldest beyond the bound.
_KEEP_PREFIX = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]))
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, key in ipairs(redis.call('ZPOPMIN', KEYS[2], over)) do
    if key ~= KEYS[1] and string.sub(key, 1, 12) == 'lstm:prefix:' then redis.call('DEL', key) end
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


# KEYS[1]: a scope's set of entries, KEYS[2]: the model version's index. Deletes the scope's entries; how many
# there were.
_CLEAR_PREFIXES = """
local cleared = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  cleared = cleared + redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], key)
end
redis.call('DEL', KEYS[1])
return cleared
"""


class RedisPrefixStore:
    """The prefix cache's second level: states after openings (signed like session states, by the caller),
    shared by the replicas, under ``lstm:prefix:<model>:<version>:state:<digest of scope and text>``; each for
    ``ttl_s``, at most ``entries`` per model version (the oldest written go first). Failures are the caller's
    misses, never its errors."""

    def __init__(self, url: str, ttl_s: float, entries: int, timeout_s: float = 0.5) -> None:
        self.url = redacted(url)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.entries = entries
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._keep = self._redis.register_script(_KEEP_PREFIX)
        self._clear = self._redis.register_script(_CLEAR_PREFIXES)

    @staticmethod
    def key(model: str, version: int, scope: str, tokens: bytes) -> str:
        digest = hashlib.sha256(scope.encode() + b"\0" + tokens).hexdigest()
        return f"{PREFIX_KEY}{model}:{version}:state:{digest}"

    async def find(self, keys: list[str]) -> tuple[int, bytes] | None:
        """The first of ``keys`` held: (its index, its value); None if none is (or Redis does not answer)."""
        try:
            values = await self._redis.mget(keys)
        except RedisError as error:
            log.warning("prefix cache store unavailable: %s", error, extra={"store": self.url})
            return None
        return next(((i, v) for i, v in enumerate(values) if v is not None), None)

    @staticmethod
    def _sets(model: str, version: int, scope: str) -> list[str]:
        """The model version's index, and ``scope``'s set of entries."""
        digest = hashlib.sha256(scope.encode()).hexdigest()
        return [f"{PREFIX_KEY}{model}:{version}:index", f"{PREFIX_KEY}{model}:{version}:scope:{digest}"]

    async def keep(self, model: str, version: int, scope: str, entries: list[tuple[str, bytes]]) -> bool:
        """Write ``entries`` (key, signed state) of one model version and scope; False if Redis did not take
        them."""
        index, members = self._sets(model, version, scope)
        now = int(time.time() * 1000)
        try:
            for key, state in entries:
                await self._keep(keys=[key, index, members], args=[state, self.ttl_ms, now, self.entries])
        except RedisError as error:
            log.warning("prefix cache store unavailable: %s", error, extra={"store": self.url})
            return False
        return True

    async def clear(self, model: str, version: int, scope: str) -> int:
        """Delete ``scope``'s entries of one model version; how many there were (UNAVAILABLE if Redis does not
        answer: the caller asked for exactly this)."""
        index, members = self._sets(model, version, scope)
        try:
            return int(await self._clear(keys=[members, index]))
        except RedisError as error:
            raise ServiceError(
                Status.UNAVAILABLE,
                f"prefix cache store unavailable (redis at {self.url}): {error}; this replica's entries were "
                "cleared, retry to clear the store's",
                reason="STORE_UNAVAILABLE",
                retry_after_s=RETRY_AFTER_S,
            ) from error

    async def close(self) -> None:
        await self._redis.aclose()
