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

Every session belongs to the tenant that created (or imported) it. Every
operation names its caller's tenant; another tenant's session is NOT_FOUND,
the same answer as an id that never existed. Any call on a session keeps it
alive for another idle timeout; a session idle longer than that is gone (the
reaper closes it in memory, Redis expires it), whichever store holds it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import grpc
from lstm.v1 import lstm_pb2 as pb

from .config import ServerConfig
from .errors import ServiceError
from .generation import GenerationEngine, SessionStepError, Turn
from .metrics import Metrics
from .registry import LoadedModel, ModelRegistry
from .requests import (
    MAX_TOKENS_SEEN,
    check_prompt,
    from_tensor,
    invalid,
    resolve_sampling,
    sampling_dict,
    sampling_proto,
    shown,
    to_tensor,
    unknown_policy,
)
from .session_store import SessionStore, SessionSummary, StoredSession
from .sessions import Session, SessionTable, new_seed, new_session_id, session_options
from .state_signing import StateSigner

SESSION_ID = re.compile(r"[0-9a-f]{32}")


def check_proposed_id(session_id: str) -> str:
    """A client-proposed session id (``x-session-id`` metadata on create or import), or "" for none."""
    if session_id and not SESSION_ID.fullmatch(session_id):
        raise invalid(
            f"x-session-id {shown(session_id)} is not a session id: propose 32 lowercase hex digits (128 random "
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
    signer: StateSigner
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
            tenant=session.tenant,
        )

    def _gauge(self, model: str) -> None:
        self.metrics.active_sessions.labels(model).set(self.sessions.count(model))

    # -- the table (this process) ---------------------------------------------------

    def _make_room(self, tenant: str) -> None:
        """With a store, a full table evicts its least recently used idle sessions (they are saved already):
        1% of the table at a time, so that a full table costs one scan per hundred new sessions, not per one."""
        if self.store is not None and len(self.sessions) >= self.sessions.max_sessions:
            for session in self.sessions.least_recently_used(max(1, self.sessions.max_sessions // 100)):
                self.evict_idle(session)
        self.sessions.check_capacity(tenant)

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
        tenant: str,
        tokens_seen: int = 0,
        has_logits: bool = False,
        session_id: str = "",
    ) -> Session:
        if session_id and self.sessions.find(session_id) is not None:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, f"session {session_id} already exists; propose another id"
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
            self.sessions.add(session)
        except BaseException:
            model.engine.slots.release(slot)
            raise
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
        """The session's state, signed (what ExportSession returns and the store keeps)."""
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
            tenant=session.tenant,
        )
        return self.signer.sign(state)

    def check_signed(self, state: pb.SessionState, tenant: str, code: grpc.StatusCode, what: str) -> None:
        """Refuse a state that this deployment did not sign, or that another tenant's session wrote."""
        problem = self.signer.verify(state)
        if problem:
            raise ServiceError(code, f"{what} is refused: {problem}; states can only be brought back as exported")
        if state.tenant != tenant:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{what} belongs to another tenant; import states your own sessions exported",
            )

    def session_from_state(self, state: pb.SessionState, tenant: str, session_id: str = "") -> Session:
        """A new session holding ``state``: signed by this deployment for this tenant, written by the model
        version this server runs, and every field within what the model and the limits allow."""
        self.check_signed(state, tenant, grpc.StatusCode.INVALID_ARGUMENT, "this session state")
        model = self.registry.of_task(state.model, "generation")
        if state.model_version != model.version:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this state was written by {state.model} version {state.model_version}, but this server runs "
                f"version {model.version}; states do not carry over between versions (pin the version with "
                "--model-versions, or start a new session)",
            )
        if state.tokens_seen > MAX_TOKENS_SEEN:
            raise invalid(f"state.tokens_seen {state.tokens_seen} is beyond the limit of {MAX_TOKENS_SEEN}")
        slots = model.engine.slots
        shape = slots.h[:, :1].shape
        # h = o * tanh(c) lies in [-1, 1]; c moves by at most 1 per character (|f c + i g| <= |c| + 1)
        h = from_tensor(state.h, shape, "state.h", bound=1.0)
        c = from_tensor(state.c, shape, "state.c", bound=float(state.tokens_seen))
        has_logits = bool(state.next_logits.shape)
        if has_logits != (state.tokens_seen > 0):
            raise invalid("state.next_logits must be given exactly when state.tokens_seen is above 0")
        logits = from_tensor(state.next_logits, slots.logits[0].shape, "state.next_logits") if has_logits else None
        defaults = sampling_dict(state.defaults)
        if "seed" not in defaults:
            raise invalid("state.defaults.seed is missing")
        resolve_sampling({}, defaults, self.config)
        session = self.new_session(model, defaults, tenant, state.tokens_seen, has_logits, session_id)
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
        summary = SessionSummary(
            state.model, state.model_version, session.tokens_seen, session.created_at, session.tenant
        )
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
        """Called by the engine when a turn's last character is fed, before its last message goes out. A turn
        that failed on its own row (``SessionStepError``) left a consistent state: it is saved as the session's
        truth, as the error message says; after any other failure the last saved state is reloaded."""
        if error is None or isinstance(error, SessionStepError):
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
        what = f"session {session_id}'s state in the session store"
        try:
            state = pb.SessionState.FromString(stored.state)
        except Exception as error:  # protobuf's DecodeError
            raise ServiceError(
                grpc.StatusCode.DATA_LOSS, f"{what} cannot be parsed ({error}); close the session, create a new one"
            ) from error
        self.check_signed(state, stored.tenant, grpc.StatusCode.DATA_LOSS, what)
        session = self.session_from_state(state, stored.tenant, session_id)
        session.revision = stored.revision
        session.created_at = stored.created_at or session.created_at
        self.metrics.store_events.labels("loaded").inc()
        return session

    async def resolve(self, session_id: str, tenant: str) -> Session:
        """The tenant's session, as the store has it: this process's copy if current, else (re)loaded. Any
        call keeps it alive; one idle past the timeout is NOT_FOUND (and closed) at once."""
        session = await self._resolve(session_id, tenant)
        if session.tenant != tenant:
            raise self.sessions.not_found(session_id)
        session.touch()
        return session

    async def _resolve(self, session_id: str, tenant: str) -> Session:
        if self.store is None:
            session = self.sessions.owned(session_id, tenant)
            if not session.busy and time.time() - session.last_used_at > self.config.idle_timeout_s:
                await self.close(session_id, tenant)
                raise self.sessions.not_found(session_id)
            return session
        local = self.sessions.find(session_id)
        if local is not None and local.tenant != tenant:
            raise self.sessions.not_found(session_id)
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
        if stored is None or stored.tenant != tenant:
            raise self.sessions.not_found(session_id)
        local = self.sessions.find(session_id)  # another call may have loaded it meanwhile
        if local is not None:
            if local.busy or local.revision >= stored.revision:
                return local
            self.evict(local)
        return self._restore(session_id, stored)

    async def resolve_idle(self, session_id: str, tenant: str) -> Session:
        """The session, as ``resolve`` finds it, if no turn is using it (ABORTED otherwise)."""
        return self.sessions.idle((await self.resolve(session_id, tenant)).id)

    # -- what the RPCs do ------------------------------------------------------------------

    async def create(self, request: pb.CreateSessionRequest, tenant: str, session_id: str = "") -> Session:
        model = self.registry.of_task(request.model, "generation")
        check_prompt(request.prompt, self.config)
        ids = model.engine.codec.encode(request.prompt, unknown_policy(request.unknown_characters))
        session = self.new_session(model, sampling_dict(request.defaults), tenant, session_id=session_id)
        session.busy = True
        try:
            await model.engine.read(session, ids)
        except BaseException:  # failed or cancelled: nobody will ever know this session's id
            self.evict(session)
            raise
        finally:
            session.busy = False
        return await self.save_new(session)

    async def fork(self, session_id: str, tenant: str) -> Session:
        source = await self.resolve_idle(session_id, tenant)
        model = self.registry.get(source.model)
        source.busy = True  # a full table must not evict the source to make room for its fork
        try:
            fork = self.new_session(model, dict(source.defaults), tenant, source.tokens_seen, source.has_logits)
            model.engine.slots.copy(source.slot, fork.slot)
        finally:
            source.busy = False
        return await self.save_new(fork)

    async def close(self, session_id: str, tenant: str) -> None:
        """Close the tenant's session, here and in the store; also one whose stored state is damaged."""
        if self.store is None:
            self.evict(self.sessions.owned(session_id, tenant))
            return
        local = self.sessions.find(session_id)
        if local is not None and local.tenant != tenant:
            raise self.sessions.not_found(session_id)
        if local is None and await self.store.tenant(session_id) != tenant:
            raise self.sessions.not_found(session_id)
        await self.store.delete(session_id)
        if local is not None:
            self.evict(local)

    async def start_turn(
        self, session_id: str, tenant: str, prompt: str, sampling: pb.SamplingParams, policy: int
    ) -> Turn:
        """Validate, then mark the session busy and submit the turn (busy is released when it completes)."""
        session = await self.resolve(session_id, tenant)
        engine = self.engine(session)
        check_prompt(prompt, self.config)
        ids = engine.codec.encode(prompt, unknown_policy(policy))
        resolved = resolve_sampling(sampling_dict(sampling), session.defaults, self.config)
        if not len(ids) and not session.has_logits:
            raise invalid(f"session {session_id} has read no text yet: give a non-empty prompt")
        self.sessions.start_turn(tenant)
        try:
            self.sessions.acquire(session_id)
            turn = engine.submit(session, ids, resolved)
        except BaseException:
            self.sessions.end_turn(tenant)
            raise
        ended = asyncio.ensure_future(turn.ended.wait())
        ended.add_done_callback(lambda _: self.sessions.end_turn(tenant))
        return turn


async def reap_idle_sessions(core: Core, every_s: float) -> None:
    """Forever: close sessions idle longer than the timeout; with a store, evict those idle longer than
    ``evict_idle_s`` instead (the store expires them after the idle timeout)."""
    while True:
        await asyncio.sleep(every_s)
        for session in core.sessions.expired(idle_s=core.idle_limit_s):
            if core.store is None:
                await core.close(session.id, session.tenant)
            else:
                core.evict_idle(session)
