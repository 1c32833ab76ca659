"""The session lifecycle the services share: create, find, turn, save, evict, close.

Without a session store, a session lives in this process's table and its
model's state slots, and nowhere else. With a store (``session_store.py``),
the store is the truth and the table a cache:

- a session is saved when it is created, forked or imported, and at the end
  of every turn, before the turn's last message is sent: a turn the client
  saw complete is never lost, whatever happens to this process afterwards;
- every call on a session first compares the cached revision with the
  store's (one small read) and reloads the state if another replica has
  moved it on, or loads it if this replica does not hold it;
- a turn whose state cannot be saved fails (UNAVAILABLE) and the cached copy
  is dropped, so the next call starts again from the last saved state;
- idle sessions leave memory (``evict_idle_s``, or the least recently used
  one when the table is full) and come back on demand.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import grpc
from lstm.v1 import lstm_pb2 as pb

from .config import ServerConfig
from .errors import ServiceError
from .generation import GenerationEngine, Turn
from .metrics import Metrics
from .registry import LoadedModel, ModelRegistry
from .requests import (
    UNKNOWN_POLICY,
    check_prompt,
    from_tensor,
    invalid,
    resolve_sampling,
    sampling_dict,
    sampling_proto,
    state_checksum,
    to_tensor,
)
from .session_store import SessionStore, SessionSummary, StoredSession
from .sessions import Session, SessionTable, new_seed, new_session_id, session_options

SESSION_ID = re.compile(r"[0-9a-f]{32}")


def check_proposed_id(session_id: str) -> str:
    """A client-proposed session id (``x-session-id`` metadata on create or import), or "" for none."""
    if session_id and not SESSION_ID.fullmatch(session_id):
        raise invalid(
            f"x-session-id {session_id[:64]!r} is not a session id: propose 32 lowercase hex digits (128 random "
            "bits), or send no x-session-id and the server picks one"
        )
    return session_id


def check_not_closed(session: Session) -> None:
    if session.closed:
        raise ServiceError(grpc.StatusCode.ABORTED, f"session {session.id} was closed while it was being made")


@dataclass
class Core:
    """What every service shares."""

    config: ServerConfig
    registry: ModelRegistry
    sessions: SessionTable
    metrics: Metrics
    store: SessionStore | None = None

    def __post_init__(self) -> None:
        if self.store is not None:
            for model in self.registry.models.values():
                if model.task == "generation":
                    model.engine.after_turn = self.after_turn

    def engine(self, session: Session) -> GenerationEngine:
        return self.registry.get(session.model).engine

    def session_proto(self, session: Session) -> pb.Session:
        return pb.Session(
            session_id=session.id,
            model=session.model,
            model_version=self.registry.get(session.model).version,
            tokens_seen=session.tokens_seen,
            defaults=sampling_proto(session.defaults),
            busy=session.busy,
            created_at=session.created_at,
            last_used_at=session.last_used_at,
        )

    def _gauge(self, model: str) -> None:
        self.metrics.active_sessions.labels(model).set(self.sessions.count(model))

    # -- the table (this process) ---------------------------------------------------

    def _make_room(self) -> None:
        """With a store, a full table evicts its least recently used idle sessions (they are saved already):
        1% of the table at a time, so that a full table costs one scan per hundred new sessions, not per one."""
        if self.store is not None and len(self.sessions) >= self.sessions.max_sessions:
            for session in self.sessions.least_recently_used(max(1, self.sessions.max_sessions // 100)):
                self.evict_idle(session)
        self.sessions.check_capacity()

    @property
    def idle_limit_s(self) -> float:
        """How long a session may sit idle in memory: the idle timeout, or with a store the eviction delay."""
        if self.store is None:
            return self.config.idle_timeout_s
        return min(self.config.evict_idle_s, self.config.idle_timeout_s)

    def new_session(
        self,
        model: LoadedModel,
        defaults: dict,
        tokens_seen: int = 0,
        has_logits: bool = False,
        session_id: str = "",
    ) -> Session:
        if session_id and self.sessions.find(session_id) is not None:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, f"session {session_id} already exists; propose another id"
            )
        self._make_room()
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
        )
        self.sessions.add(session)
        self._gauge(model.name)
        return session

    def evict(self, session: Session) -> None:
        """Take the session out of this process (its saved state, if any, stays in the store)."""
        if session.closed:  # closed or evicted already
            return
        self.sessions.remove(session.id)
        self.engine(session).close(session)
        self._gauge(session.model)

    def evict_idle(self, session: Session) -> None:
        """Evict a saved, idle session to free memory (counted: the store will load it back on demand)."""
        self.evict(session)
        self.metrics.store_events.labels("evicted").inc()

    # -- state ------------------------------------------------------------------------

    def state_of(self, session: Session) -> pb.SessionState:
        """The session's state as a self-checking message (what ExportSession returns and the store keeps)."""
        model = self.registry.get(session.model)
        slots = model.engine.slots
        state = pb.SessionState(
            model=model.name,
            model_version=model.version,
            tokens_seen=session.tokens_seen,
            h=to_tensor(slots.h[:, session.slot : session.slot + 1]),
            c=to_tensor(slots.c[:, session.slot : session.slot + 1]),
            next_logits=to_tensor(slots.logits[session.slot]) if session.has_logits else pb.Tensor(),
            defaults=sampling_proto(session.defaults),
        )
        state.checksum = state_checksum(state)
        return state

    def session_from_state(self, state: pb.SessionState, session_id: str = "") -> Session:
        """A new session holding ``state``, refused unless this server runs the model version that wrote it."""
        model = self.registry.of_task(state.model, "generation")
        if state.model_version != model.version:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this state was written by {state.model} version {state.model_version}, but this server runs "
                f"version {model.version}; states do not carry over between versions (pin the version with "
                "--model-versions, or start a new session)",
            )
        if state.checksum != state_checksum(state):
            raise invalid("session state checksum mismatch: the state was altered or truncated; export it again")
        slots = model.engine.slots
        shape = slots.h[:, :1].shape
        h, c = from_tensor(state.h, shape, "state.h"), from_tensor(state.c, shape, "state.c")
        has_logits = bool(state.next_logits.shape)
        logits = from_tensor(state.next_logits, slots.logits[0].shape, "state.next_logits") if has_logits else None
        session = self.new_session(model, sampling_dict(state.defaults), state.tokens_seen, has_logits, session_id)
        slots.h[:, session.slot], slots.c[:, session.slot] = h[:, 0], c[:, 0]
        if logits is not None:
            slots.logits[session.slot] = logits
        return session

    # -- the store ----------------------------------------------------------------------

    async def save(self, session: Session) -> None:
        """Write the session's state over the revision this process holds (no-op without a store)."""
        if self.store is None:
            return
        state = self.state_of(session)
        summary = SessionSummary(state.model, state.model_version, session.tokens_seen, session.created_at)
        session.revision = await self.store.save(session.id, state.SerializeToString(), summary, session.revision)
        self.metrics.store_events.labels("saved").inc()

    async def save_new(self, session: Session) -> Session:
        """Save a session just made here; if that fails, or it is closed meanwhile, it never existed."""
        session.busy = True  # nobody may use it before it is in the store
        try:
            check_not_closed(session)  # its slot may serve another session already
            await self.save(session)
            if session.closed and self.store is not None:  # closed during the save: take the save back
                await self.store.delete(session.id)
            check_not_closed(session)
        except BaseException:
            self.evict(session)
            raise
        finally:
            session.busy = False
        session.touch()
        return session

    async def after_turn(self, session: Session, error: BaseException | None) -> None:
        """Called by the engine when a turn's last character is fed, before its last message goes out."""
        if error is None:
            try:
                await self.save(session)
                return
            except BaseException:
                if session.closed:  # closed during the save: the turn ends as 'closed during the turn'
                    return
                self.evict(session)  # the next call reloads the last saved state
                raise
        self.evict(session)  # a failed turn's state is not trusted: reload the last saved one

    def _restore(self, session_id: str, stored: StoredSession) -> Session:
        state = pb.SessionState.FromString(stored.state)
        if state.checksum != state_checksum(state):
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS,
                f"session {session_id}'s state in the session store fails its checksum: it was altered or damaged "
                "there; the session cannot be continued, create a new one",
            )
        session = self.session_from_state(state, session_id)
        session.revision = stored.revision
        session.created_at = stored.created_at or session.created_at
        self.metrics.store_events.labels("loaded").inc()
        return session

    async def resolve(self, session_id: str) -> Session:
        """The session, as the store has it: this process's copy if current, else (re)loaded."""
        if self.store is None:
            return self.sessions.get(session_id)
        local = self.sessions.find(session_id)
        if local is not None and local.busy:
            return local  # in a turn here: the caller gets the usual 'busy' answer
        revision = await self.store.revision(session_id)
        local = self.sessions.find(session_id)
        if local is not None and (local.busy or local.revision == revision):
            return local
        if local is not None:
            self.evict(local)  # stale (another replica moved it on) or expired in the store
        if revision is None:
            raise self.sessions.not_found(session_id)
        stored = await self.store.load(session_id)
        if stored is None:
            raise self.sessions.not_found(session_id)
        local = self.sessions.find(session_id)  # another call may have loaded it meanwhile
        if local is not None:
            if local.busy or local.revision >= stored.revision:
                return local
            self.evict(local)
        return self._restore(session_id, stored)

    async def resolve_idle(self, session_id: str) -> Session:
        """The session, as ``resolve`` finds it, if no turn is using it (ABORTED otherwise)."""
        return self.sessions.idle((await self.resolve(session_id)).id)

    # -- what the RPCs do ------------------------------------------------------------------

    async def create(self, request: pb.CreateSessionRequest, session_id: str = "") -> Session:
        model = self.registry.of_task(request.model, "generation")
        check_prompt(request.prompt, self.config)
        ids = model.engine.codec.encode(request.prompt, UNKNOWN_POLICY[request.unknown_characters])
        session = self.new_session(model, sampling_dict(request.defaults), session_id=session_id)
        session.busy = True
        try:
            await model.engine.read(session, ids)
        except BaseException:  # failed or cancelled: nobody will ever know this session's id
            self.evict(session)
            raise
        finally:
            session.busy = False
        return await self.save_new(session)

    async def fork(self, session_id: str) -> Session:
        source = await self.resolve_idle(session_id)
        model = self.registry.get(source.model)
        source.busy = True  # a full table must not evict the source to make room for its fork
        try:
            fork = self.new_session(model, dict(source.defaults), source.tokens_seen, source.has_logits)
            model.engine.slots.copy(source.slot, fork.slot)
        finally:
            source.busy = False
        return await self.save_new(fork)

    async def close(self, session_id: str) -> None:
        session = await self.resolve(session_id)
        if self.store is not None:
            await self.store.delete(session_id)
        self.evict(session)

    async def start_turn(self, session_id: str, prompt: str, sampling: pb.SamplingParams, policy: int) -> Turn:
        """Validate, then mark the session busy and submit the turn (busy is released when it completes)."""
        session = await self.resolve(session_id)
        engine = self.engine(session)
        check_prompt(prompt, self.config)
        ids = engine.codec.encode(prompt, UNKNOWN_POLICY[policy])
        resolved = resolve_sampling(sampling_dict(sampling), session.defaults, self.config)
        if not len(ids) and not session.has_logits:
            raise invalid(f"session {session_id} has read no text yet: give a non-empty prompt")
        self.sessions.acquire(session_id)
        return engine.submit(session, ids, resolved)


async def reap_idle_sessions(core: Core, every_s: float) -> None:
    """Forever: close sessions idle longer than the timeout; with a store, evict those idle longer than
    ``evict_idle_s`` instead (the store expires them after the idle timeout)."""
    while True:
        await asyncio.sleep(every_s)
        for session in core.sessions.expired(idle_s=core.idle_limit_s):
            if core.store is None:
                await core.close(session.id)
            else:
                core.evict_idle(session)
