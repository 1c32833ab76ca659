"""The session lifecycle the services share: create, find, turn, save, evict, close.

A session lives in this process's table and its model engine's state slot,
and in its store (``store.py``): with the memory store the table is the only
copy; with Redis the store is the truth and the table a cache. One path for
both:

- a session is saved when it is created, forked or imported, and at the end
  of every turn, before the turn's last message is sent: a turn the client
  saw complete is never lost, whatever happens to this process afterwards;
- every call on a session first compares the cached revision with the
  store's (one small read with Redis) and reloads the state if another replica
  has moved it on, or loads it if this replica does not hold it;
- a turn whose state cannot be saved fails (UNAVAILABLE) and the cached copy
  is dropped, so the next call starts again from the last saved state;
- with a durable store, idle sessions leave memory (``evict_idle_s``, or the
  least recently used one when the table is full) and come back on demand.

A session's life is one ``Phase`` (session.py), moved only here (``_move``). A
turn is read through a ``TurnStream`` (turn.py); when the engine has fed its
last character, ``_settle`` counts what the state read, saves it, frees the
session, and only then lets the last message go; it does all that even when
the client has gone.

Every session belongs to the tenant that created (or imported) it. Every
operation names its caller's tenant; another tenant's session is NOT_FOUND,
the same answer as an id that never existed. Any call on a session keeps it
alive for another idle timeout; a session idle longer than that is gone (the
reaper closes it in memory, Redis expires it), whichever store holds it.

Everything here runs on the event loop: it is the only writer of a Session.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import tracing
from ..config import ServerConfig
from ..engine.faults import RowFailed
from ..engine.generation import GenerationEngine
from ..engine.models import ServedModel, ServedModels
from ..engine.prefill import CacheUse
from ..engine.prefix_cache import CachedState
from ..engine.turn import LENGTH, Turn, TurnEnd
from ..errors import ServiceError, Status, invalid
from ..logs import bind
from ..metrics import Metrics
from .failures import SessionStepError, read_error, turn_error
from .redis_store import RedisPrefixStore
from .session import Phase, Session, SessionState, new_seed, new_session_id, resolve_sampling, session_options
from .store import SessionStore, SessionSummary, StateCodec, StoredSession
from .table import SessionTable
from .turn import TurnOutcome, TurnStream

log = logging.getLogger(__name__)


def key_bytes(tokens: np.ndarray) -> bytes:
    """Token ids as the second level's keys take them: 4 bytes each, little-endian."""
    return np.ascontiguousarray(tokens, "<u4").tobytes()


def check_not_closed(session: Session) -> None:
    if session.closed:
        raise ServiceError(
            Status.ABORTED, f"session {session.id} was closed while it was being made", reason="SESSION_CLOSED"
        )


def record_lookup(use: CacheUse | None) -> None:
    """The trace span of a prefix cache lookup (timed by the prefill thread): the cached characters it found."""
    if use is not None and use.ended:
        tracing.record("lstm.prefix_cache.lookup", use.started, use.ended, {"lstm.cached_characters": use.saved})


def record_turn(turn: Turn, end: TurnEnd, read: int, prompt: int) -> None:
    """The trace spans of a complete turn, from the times the model thread took: queueing (until the model thread
    took it), prefill (its prompt read and first character drawn; only with a prompt) and decode (from the first
    character to the last one fed). ``read``: the characters the state had read before the turn."""
    if not tracing.enabled() or turn.admitted_at is None or turn.ended_at is None:
        return
    error = end.failure.kind if end.failure is not None else None
    tracing.record("lstm.queue", turn.submitted_at, turn.admitted_at, {})
    if prompt:
        prefilled = turn.first_at or turn.ended_at
        failed = error if turn.first_at is None else None
        tracing.record("lstm.prefill", turn.admitted_at, prefilled, {"lstm.characters": prompt}, failed)
        record_lookup(turn.cache)
    if turn.first_at is not None:
        attributes = {
            "lstm.characters": max(0, end.tokens_seen - read - prompt),
            "lstm.model_calls": turn.model_calls,
            "lstm.finish_reason": end.finish_reason or "",
        }
        tracing.record("lstm.decode", turn.first_at, turn.ended_at, attributes, error)


@dataclass
class SessionManager:
    """Sessions of every generation model of this server: the table, the store behind it, and their turns."""

    config: ServerConfig
    models: ServedModels
    table: SessionTable
    metrics: Metrics
    store: SessionStore
    codec: StateCodec  # the states a store keeps, as bytes (the api layer's StateMessages)
    prefixes: RedisPrefixStore | None = None  # the prefix cache's second level (--prefix-cache-store-ttl-s)
    _settling: set[asyncio.Task] = field(default_factory=set, init=False, repr=False)  # turns being settled

    def _move(self, session: Session, phase: Phase) -> None:
        """The one writer of ``Session.phase``."""
        session.phase = phase

    def _track(self, task: asyncio.Task) -> None:
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _engine(self, session: Session) -> GenerationEngine:
        return self.models.get(session.model).engine

    def _gauge(self, model: str) -> None:
        self.metrics.active_sessions.labels(model).set(self.table.count(model))

    # -- the table (this process) ---------------------------------------------------

    def _make_room(self, tenant: str) -> None:
        """With a durable store, a full table evicts its least recently used idle sessions (they are saved
        already): 1% of the table at a time, so that a full table costs one scan per hundred new sessions, not
        per one."""
        if self.store.durable and len(self.table) >= self.table.max_sessions:
            for session in self.table.least_recently_used(max(1, self.table.max_sessions // 100)):
                self.evict(session, to_store=True)
        self.table.check_capacity(tenant)

    @property
    def idle_limit_s(self) -> float:
        """How long a session may sit idle in memory: the idle timeout, or with a durable store the eviction
        delay."""
        if self.store.durable:
            return min(self.config.evict_idle_s, self.config.idle_timeout_s)
        return self.config.idle_timeout_s

    def new_session(
        self,
        model: ServedModel,
        defaults: dict[str, Any],
        tenant: str,
        tokens_seen: int = 0,
        has_logits: bool = False,
        session_id: str = "",
    ) -> Session:
        """A session in the table, with a zeroed slot of ``model``'s engine (nothing saved yet)."""
        if session_id and self.table.find(session_id) is not None:
            raise ServiceError(
                Status.ALREADY_EXISTS,
                f"session {session_id} already exists; propose another id",
                reason="SESSION_EXISTS",
            )
        self._make_room(tenant)
        defaults = {"seed": new_seed(), **defaults}
        resolve_sampling({}, defaults, self.config)  # refuse bad defaults now, not at the first turn
        slot = model.engine.slots.allocate()
        session = Session(
            session_id or new_session_id(),
            model.name,
            slot,
            defaults["seed"],
            session_options(defaults),
            tokens_seen,
            has_logits,
            tenant=tenant,
        )
        try:
            self.table.add(session)
        except BaseException:
            model.engine.slots.release(slot)
            raise
        self._gauge(model.name)
        bind(session=session.id, model=model.name)
        return session

    def evict(self, session: Session, to_store: bool = False) -> None:
        """Take the session out of this process and mark it closed (its saved state, if any, stays in the store;
        ``to_store``: counted as evicted, to be loaded back on demand). Its slot is freed once nothing uses it: at
        once if idle, after a read in flight, or when its turn ends (the turn is cancelled)."""
        if session.closed:  # closed or evicted already
            return
        if to_store:
            self.metrics.store_events.labels("evicted").inc()
        self.table.remove(session.id)
        if session.turn is not None:
            self._move(session, Phase.CLOSING)
            session.turn.cancel()  # _settle frees the slot
        elif session.busy:
            self._move(session, Phase.CLOSED)
            self._engine(session).release_after_pending(session.slot)
        else:
            self._move(session, Phase.CLOSED)
            self._engine(session).slots.release(session.slot)
        self._gauge(session.model)

    async def reap_idle(self, every_s: float) -> None:
        """Forever, every ``every_s`` seconds: sessions idle longer than ``idle_limit_s`` leave memory, evicted to
        a durable store (which expires them itself after the idle timeout), or closed with the memory store (the
        table held their only copy)."""
        while True:
            await asyncio.sleep(every_s)
            for session in self.table.expired(idle_s=self.idle_limit_s):
                self.evict(session, to_store=self.store.durable)

    def list_sessions(self, tenant: str, model: str, after: int, size: int) -> tuple[list[Session], int]:
        """A page of the tenant's sessions in this process (``SessionTable.page``)."""
        return self.table.page(tenant, model, after, size)

    # -- state ------------------------------------------------------------------------

    def snapshot(self, session: Session) -> SessionState:
        """The session's state, copied out of its slot."""
        model = self.models.get(session.model)
        h, c, logits = model.engine.slots.read(session.slot)
        return SessionState(
            model.name,
            model.version,
            session.tokens_seen,
            h,
            c,
            logits if session.has_logits else None,
            session.defaults,
            session.tenant,
        )

    def restore(self, state: SessionState, tenant: str, session_id: str = "") -> Session:
        """A new session holding ``state`` (checked by the api layer: signed for this tenant, this model version,
        every field within the limits)."""
        model = self.models.of_task(state.model, "generation")
        has_logits = state.next_logits is not None
        session = self.new_session(model, state.defaults, tenant, state.tokens_seen, has_logits, session_id)
        model.engine.slots.write(session.slot, state.h, state.c, state.next_logits)
        return session

    # -- the store ----------------------------------------------------------------------

    async def save(self, session: Session) -> None:
        """Write the session's state over the revision this process holds (the memory store keeps nothing, and
        never encodes it)."""
        state = self.snapshot(session)
        summary = SessionSummary(state.model, state.model_version, state.tokens_seen, session.created_at, state.tenant)
        with tracing.span("lstm.store.save"):
            session.revision = await self.store.save(
                session.id, lambda: self.codec.encode(state), summary, session.revision
            )

    async def save_new(self, session: Session) -> Session:
        """Save a session just made here; if that fails, or it is closed meanwhile, it never existed."""
        self._move(session, Phase.BUSY)  # nobody may use it before it is in the store
        try:
            check_not_closed(session)  # its slot may serve another session already
            await self.save(session)
            if session.closed:  # closed during the save: take the save back
                await self.store.delete(session.id)
            check_not_closed(session)
        except BaseException:
            self.evict(session)
            raise
        self._move(session, Phase.IDLE)
        session.touch()
        return session

    def _load(self, session_id: str, stored: StoredSession) -> Session:
        """A session in this process from the state the store holds."""
        session = self.restore(self.codec.decode(stored.state, stored.tenant, session_id), stored.tenant, session_id)
        session.revision = stored.revision
        session.created_at = stored.created_at or session.created_at
        self.metrics.store_events.labels("loaded").inc()
        return session

    async def resolve(self, session_id: str, tenant: str, idle: bool = False) -> Session:
        """The tenant's session, as the store has it: this process's copy if current, else (re)loaded; ``idle``:
        ABORTED if a turn is using it. Any call keeps it alive; one idle past the timeout is NOT_FOUND (and closed)
        at once."""
        session = await self._resolve(session_id, tenant)
        if session.tenant != tenant:
            raise self.table.not_found(session_id)
        if idle:
            self.table.idle(session.id)
        session.touch()
        bind(session=session.id, model=session.model)
        return session

    async def _resolve(self, session_id: str, tenant: str) -> Session:
        local = self.table.find(session_id)
        if local is not None and local.tenant != tenant:
            raise self.table.not_found(session_id)
        if local is not None and local.busy:
            return local  # in a turn here: the caller gets the usual 'busy' answer
        with tracing.span("lstm.store.revision"):
            revision = await self.store.revision(session_id, tenant)  # None for another tenant's: nothing touched
        local = self.table.find(session_id)
        if local is not None and (local.busy or local.revision == revision):
            return local
        if local is not None:
            self.evict(local)  # stale (another replica moved it on) or expired in the store
        if revision is None:
            raise self.table.not_found(session_id)
        with tracing.span("lstm.store.load"):
            stored = await self.store.load(session_id)
        if stored is None or stored.tenant != tenant:
            raise self.table.not_found(session_id)
        local = self.table.find(session_id)  # another call may have loaded it meanwhile
        if local is not None:
            if local.busy or local.revision >= stored.revision:
                return local
            self.evict(local)
        return self._load(session_id, stored)

    # -- what the RPCs do ------------------------------------------------------------------

    async def create(
        self, model: ServedModel, tokens: np.ndarray, defaults: dict[str, Any], tenant: str, session_id: str = ""
    ) -> Session:
        """A new session of ``model`` that has read ``tokens``, saved."""
        session = self.new_session(model, defaults, tenant, session_id=session_id)
        session.fresh = True
        self._move(session, Phase.BUSY)
        try:
            if len(tokens):
                await self.fetch_prefix(session, tokens)
                with tracing.span("lstm.prefill", {"lstm.characters": len(tokens)}):
                    session.fresh = False
                    use = await model.engine.read(session.slot, tokens, fresh_for=tenant)
                    record_lookup(use)
                self._publish(model, tokens, use)
                session.tokens_seen += len(tokens)
                session.has_logits = True
        except RowFailed as failed:
            self.evict(session)
            raise read_error(failed.failure, session.id) from failed.failure.cause
        except BaseException:  # failed or cancelled: nobody will ever know this session's id
            self.evict(session)
            raise
        return await self.save_new(session)

    async def fork(self, session_id: str, tenant: str) -> Session:
        source = await self.resolve(session_id, tenant, idle=True)
        model = self.models.get(source.model)
        self._move(source, Phase.BUSY)  # a full table must not evict the source to make room for its fork
        try:
            fork = self.new_session(model, dict(source.defaults), tenant, source.tokens_seen, source.has_logits)
            model.engine.slots.copy(source.slot, fork.slot)
        finally:
            if not source.closed:
                self._move(source, Phase.IDLE)
        return await self.save_new(fork)

    async def export(self, session_id: str, tenant: str) -> SessionState:
        """The state of the tenant's session, if no turn is using it."""
        return self.snapshot(await self.resolve(session_id, tenant, idle=True))

    async def import_session(self, state: SessionState, tenant: str, session_id: str = "") -> Session:
        """A new session holding ``state`` (checked by the api layer), saved."""
        return await self.save_new(self.restore(state, tenant, session_id))

    async def close(self, session_id: str, tenant: str) -> None:
        """Close the tenant's session, here and in the store; also one whose stored state is damaged."""
        local = self.table.find(session_id)
        if local is not None and local.tenant != tenant:
            raise self.table.not_found(session_id)
        if local is None and await self.store.tenant(session_id) != tenant:
            raise self.table.not_found(session_id)
        await self.store.delete(session_id)
        if local is not None:
            self.evict(local)

    def start_turn(self, session: Session, tokens: np.ndarray, sampling: dict[str, Any]) -> TurnStream:
        """Submit a turn on the session (just resolved; ABORTED if busy) reading ``tokens`` then generating with
        ``sampling`` over the session's defaults; read it through the returned stream, and ``close`` it."""
        engine = self._engine(session)
        resolved = resolve_sampling(sampling, session.defaults, self.config)
        if not len(tokens) and not session.has_logits and not session.busy:  # a busy one is refused as busy
            raise invalid(
                f"session {session.id} has read no text yet: give a non-empty prompt",
                reason="PROMPT_REQUIRED",
                field="prompt",
            )
        self.table.idle(session.id)
        self.table.start_turn(session.tenant)
        try:
            fresh_for = session.tenant if session.fresh else None
            turn = engine.submit(session.slot, tokens, resolved, session.tokens_seen, fresh_for)
        except BaseException:
            self.table.end_turn(session.tenant)
            raise
        session.fresh = session.fresh and not len(tokens)
        self._move(session, Phase.RUNNING)
        session.touch()
        read = session.tokens_seen

        async def settle(end: TurnEnd) -> TurnOutcome:
            self._publish(self.models.get(session.model), tokens, turn.cache)
            return await self._settle(session, turn, end, read, len(tokens))

        session.turn = TurnStream(turn, settle, self._track, self.metrics, session.model)
        return session.turn

    async def _settle(self, session: Session, turn: Turn, end: TurnEnd, read: int, prompt: int) -> TurnOutcome:
        """A turn's end (after its ``prompt`` characters; the state had read ``read`` before it): count what the
        state read, save it (a turn that failed on its own row kept a consistent state: it is saved too), free the
        session; the outcome is what its last message says."""
        error = turn_error(end.failure, session.id) if end.failure is not None else None
        if error is not None:
            log.error("%s", error.message)  # the engine logged the cause
        session.has_logits = session.has_logits or end.tokens_seen > session.tokens_seen
        session.tokens_seen = end.tokens_seen
        try:
            if not session.closed:
                await self._save_turn(session, error)
        except ServiceError as failure:
            error = error or failure
        except Exception as failure:  # a bug in the save: the turn must not look saved
            log.exception("saving the turn failed for session %s", session.id)
            error = error or ServiceError(Status.INTERNAL, f"generation failed: {failure}")
        finally:
            session.turn = None
            session.touch()
            self.table.end_turn(session.tenant)
            if session.closed:
                self._move(session, Phase.CLOSED)
                self._engine(session).slots.release(session.slot)
            else:
                self._move(session, Phase.IDLE)
            if error is None and session.closed and end.finish_reason is None:
                error = ServiceError(
                    Status.ABORTED, f"session {session.id} was closed during the turn", reason="SESSION_CLOSED"
                )
        try:
            record_turn(turn, end, read, prompt)
        except Exception:  # tracing must not fail a settled turn
            log.exception("recording the turn's spans failed")
        finished = "error" if error is not None else end.finish_reason or "cancelled"
        self.metrics.count_turn(session.model, prompt, max(0, end.tokens_seen - read - prompt), finished)
        return TurnOutcome(end.finish_reason or LENGTH, error)

    async def _save_turn(self, session: Session, error: ServiceError | None) -> None:
        """Save the state a turn left; after a failure that did not keep a consistent state, drop this copy if
        the store can bring back the last saved one."""
        if error is None or isinstance(error, SessionStepError):
            try:
                await self.save(session)
                return
            except BaseException:
                if session.closed:  # closed during the save: the turn ends as 'closed during the turn'
                    return
                self.evict(session)  # the next call reloads the last saved state
                raise
        if self.store.durable:
            self.evict(session)  # a failed turn's state is not trusted: reload the last saved one

    # -- the prefix cache's second level ------------------------------------------------------

    async def fetch_prefix(self, session: Session, tokens: np.ndarray) -> None:
        """Before a fresh session reads ``tokens`` (its prompt at creation, or its first turn's): the longest of
        their prefixes the second level holds (at the stride's multiples and at their end) goes into the engine's
        prefix cache first. A miss, or a store that does not answer, changes nothing."""
        model = self.models.get(session.model)
        engine = model.engine
        if self.prefixes is None or not session.fresh or not len(tokens) or not engine.cache.enabled:
            return
        scope = engine.cache_scope(session.tenant)
        stride = engine.cache.stride
        positions = [len(tokens), *range((len(tokens) - 1) // stride * stride, 0, -stride)][:64] if stride else []
        positions = positions or [len(tokens)]
        ids = key_bytes(tokens)
        keys = [self.prefixes.key(model.name, model.version, scope, ids[: 4 * p]) for p in positions]
        events = self.metrics.prefix_cache_store
        with tracing.span("lstm.prefix_cache.store", {"lstm.keys": len(keys)}):
            found = await self.prefixes.find(keys)
        if found is None:
            events.labels(model.name, "miss").inc()
            return
        at, data = found
        try:
            state = self.codec.decode(data, scope, f"prefix cache entry {keys[at]}")
        except ServiceError as error:
            log.warning("prefix cache entry refused: %s", error.message)
            events.labels(model.name, "failed").inc()
            return
        if state.tokens_seen != positions[at] or state.next_logits is None:
            events.labels(model.name, "failed").inc()
            return
        events.labels(model.name, "hit").inc()
        engine.offer(scope, tokens[: positions[at]], CachedState(state.next_logits[None], state.h, state.c))

    async def clear_prefixes(self, model: ServedModel, tenant: str) -> tuple[int, int]:
        """Forget ``tenant``'s own prefix cache entries of ``model``: in this replica's engine, then in the second
        level; how many each held."""
        cleared = await model.engine.clear_cache(tenant)
        if self.prefixes is None:
            return cleared, 0
        return cleared, await self.prefixes.clear(model.name, model.version, f"tenant:{tenant}")

    def _publish(self, model: ServedModel, tokens: np.ndarray, use: CacheUse | None) -> None:
        """After a fresh read: the states it read at the stride's multiples and at its end go to the second level
        (in the background, signed like session states, for the read's scope)."""
        if self.prefixes is None or use is None or not use.read:
            return
        ids = key_bytes(tokens)
        entries = [
            (
                self.prefixes.key(model.name, model.version, use.scope, ids[: 4 * p]),
                self.codec.encode(
                    SessionState(model.name, model.version, p, s.h, s.c, s.logits[0], {"seed": 0}, use.scope)
                ),
            )
            for p, s in use.read
        ]
        use.read = []

        async def write() -> None:
            kept = await self.prefixes.keep(model.name, model.version, use.scope, entries)
            self.metrics.prefix_cache_store.labels(model.name, "written" if kept else "failed").inc(len(entries))

        self._track(asyncio.create_task(write()))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the turns still running and wait (at most ``timeout_s``) until each is saved and its session
        free."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            running = [s.turn for s in self.table.sessions() if s.turn is not None]
            for turn in running:
                turn.close()
            if not running and not self._settling:
                return
            if self._settling:
                await asyncio.wait(list(self._settling), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
            else:
                await asyncio.sleep(0.01)  # a caller still reading settles its own turn
