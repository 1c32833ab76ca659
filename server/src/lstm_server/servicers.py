"""The gRPC services: thin translations between protobuf messages and the engines.

Errors are raised as ``ServiceError`` and turned into statuses by the
interceptor (``interceptors.py``), which also counts and logs every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from .config import ServerConfig
from .errors import ServiceError
from .generation import GenerationEngine, Turn
from .metrics import Metrics
from .registry import LoadedModel, ModelRegistry
from .requests import (
    FINISH_REASON,
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
from .sessions import Session, SessionTable, new_seed, new_session_id


@dataclass
class Core:
    """What every service shares."""

    config: ServerConfig
    registry: ModelRegistry
    sessions: SessionTable
    metrics: Metrics

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
        self.metrics.active_sessions.labels(model).set(len(self.sessions.sessions(model)))

    def new_session(
        self, model: LoadedModel, defaults: dict, tokens_seen: int = 0, has_logits: bool = False
    ) -> Session:
        self.sessions.check_capacity()
        defaults = {"seed": new_seed(), **defaults}
        resolve_sampling({}, defaults, self.config)  # refuse bad defaults now, not at the first turn
        slot = model.engine.slots.allocate()
        session = Session(new_session_id(), model.name, slot, defaults, tokens_seen, has_logits)
        self.sessions.add(session)
        self._gauge(model.name)
        return session

    def close(self, session_id: str) -> None:
        session = self.sessions.remove(session_id)
        self.engine(session).close(session)
        self._gauge(session.model)

    async def create(self, request: pb.CreateSessionRequest) -> Session:
        model = self.registry.of_task(request.model, "generation")
        check_prompt(request.prompt, self.config)
        ids = model.engine.codec.encode(request.prompt, UNKNOWN_POLICY[request.unknown_characters])
        session = self.new_session(model, sampling_dict(request.defaults))
        if len(ids):
            session.busy = True
            try:
                await model.engine.read(session, ids)
            except BaseException:  # failed or cancelled: nobody will ever know this session's id
                self.close(session.id)
                raise
            finally:
                session.busy = False
        return session

    def start_turn(self, session_id: str, prompt: str, sampling: pb.SamplingParams, policy: int) -> Turn:
        """Validate, then mark the session busy and submit the turn (busy is released when it completes)."""
        session = self.sessions.get(session_id)
        engine = self.engine(session)
        check_prompt(prompt, self.config)
        ids = engine.codec.encode(prompt, UNKNOWN_POLICY[policy])
        resolved = resolve_sampling(sampling_dict(sampling), session.defaults, self.config)
        if not len(ids) and not session.has_logits:
            raise invalid(f"session {session_id} has read no text yet: give a non-empty prompt")
        self.sessions.acquire(session_id)
        return engine.submit(session, ids, resolved)


class SessionsService(rpc.SessionsServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def CreateSession(self, request, context):
        return self.core.session_proto(await self.core.create(request))

    async def GetSession(self, request, context):
        return self.core.session_proto(self.core.sessions.get(request.session_id))

    async def ListSessions(self, request, context):
        if request.model:
            self.core.registry.get(request.model)
        return pb.ListSessionsResponse(
            sessions=[self.core.session_proto(s) for s in self.core.sessions.sessions(request.model)]
        )

    async def ForkSession(self, request, context):
        source = self.core.sessions.idle(request.session_id)
        model = self.core.registry.get(source.model)
        fork = self.core.new_session(model, dict(source.defaults), source.tokens_seen, source.has_logits)
        model.engine.slots.copy(source.slot, fork.slot)
        return self.core.session_proto(fork)

    async def CloseSession(self, request, context):
        self.core.close(request.session_id)
        return pb.CloseSessionResponse()

    async def ExportSession(self, request, context):
        session = self.core.sessions.idle(request.session_id)
        model = self.core.registry.get(session.model)
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
        session.touch()
        return state

    async def ImportSession(self, request, context):
        state = request.state
        model = self.core.registry.of_task(state.model, "generation")
        if state.model_version != model.version:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this state was written by {state.model} version {state.model_version}, but this server runs "
                f"version {model.version}; states do not carry over between versions",
            )
        if state.checksum != state_checksum(state):
            raise invalid("session state checksum mismatch: the state was altered or truncated; export it again")
        slots = model.engine.slots
        shape = slots.h[:, :1].shape
        h, c = from_tensor(state.h, shape, "state.h"), from_tensor(state.c, shape, "state.c")
        has_logits = bool(state.next_logits.shape)
        logits = from_tensor(state.next_logits, slots.logits[0].shape, "state.next_logits") if has_logits else None
        session = self.core.new_session(model, sampling_dict(state.defaults), state.tokens_seen, has_logits)
        slots.h[:, session.slot], slots.c[:, session.slot] = h[:, 0], c[:, 0]
        if logits is not None:
            slots.logits[session.slot] = logits
        return self.core.session_proto(session)


class GenerationService(rpc.GenerationServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        turn = self.core.start_turn(request.session_id, request.prompt, request.sampling, request.unknown_characters)
        context.add_done_callback(lambda _: turn.cancel())
        try:
            async for chunk in turn.chunks():
                yield pb.GenerateResponse(
                    text=chunk.text,
                    tokens_seen=chunk.tokens_seen,
                    finish_reason=FINISH_REASON.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                )
        finally:
            turn.cancel()

    async def Chat(self, request_iterator, context) -> AsyncIterator[pb.ChatResponse]:
        session: Session | None = None
        current: list[Turn] = []  # the running turn, cancelled if the call ends under it
        context.add_done_callback(lambda _: current and current[-1].cancel())
        async for message in request_iterator:
            which = message.WhichOneof("session")
            if session is None:
                if which == "create":
                    session = await self.core.create(message.create)
                elif which == "session_id":
                    session = self.core.sessions.get(message.session_id)
                else:
                    raise invalid("the first Chat message must name a session (session_id) or create one (create)")
                if not message.text:
                    yield pb.ChatResponse(session_id=session.id, end_of_turn=True, tokens_seen=session.tokens_seen)
                    continue
            elif which is not None:
                raise invalid("only the first Chat message may name or create the session")
            turn = self.core.start_turn(session.id, message.text, message.sampling, pb.UNKNOWN_CHARACTERS_REJECT)
            current[:] = [turn]
            try:
                async for chunk in turn.chunks():
                    yield pb.ChatResponse(
                        session_id=session.id,
                        text=chunk.text,
                        end_of_turn=chunk.finish_reason is not None,
                        finish_reason=FINISH_REASON.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                        tokens_seen=chunk.tokens_seen,
                    )
            finally:
                turn.cancel()

    async def Step(self, request, context):
        model = self.core.registry.of_task(request.model, "generation")
        engine: GenerationEngine = model.engine
        which = request.WhichOneof("input")
        if which == "text":
            check_prompt(request.text, self.core.config, "text")
            ids = engine.codec.encode(request.text, UNKNOWN_POLICY[request.unknown_characters])
        elif which == "tokens":
            check_prompt(request.tokens.ids, self.core.config, "tokens")
            ids = engine.codec.validate_ids(list(request.tokens.ids))
        else:
            ids = np.zeros(0, np.int64)
        if not len(ids):
            raise invalid("Step needs a non-empty text or token list")
        shape = engine.slots.h[:, :1].shape
        if request.HasField("h") != request.HasField("c"):
            raise invalid("give both h and c, or neither (a fresh sequence)")
        if request.HasField("h"):
            h, c = from_tensor(request.h, shape, "h"), from_tensor(request.c, shape, "c")
        else:
            h, c = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        probabilities, h, c = await engine.step(ids, h, c)
        return pb.StepResponse(h=to_tensor(h), c=to_tensor(c), probabilities=probabilities.tolist())


class ClassificationService(rpc.ClassificationServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Classify(self, request, context):
        model = self.core.registry.of_task(request.model, "classification")
        config = self.core.config
        if not request.texts:
            raise invalid("Classify needs at least one text")
        if len(request.texts) > config.max_classify_texts:
            raise invalid(
                f"{len(request.texts)} texts in one call; the limit is {config.max_classify_texts} "
                "(max_classify_texts): split the batch"
            )
        for i, text in enumerate(request.texts):
            if len(text) > config.max_classify_chars:
                raise invalid(
                    f"texts[{i}] has {len(text)} characters; the limit is {config.max_classify_chars} "
                    "(max_classify_chars)"
                )
        rows = await model.engine.classify(list(request.texts))
        labels = model.entry.labels
        return pb.ClassifyResponse(
            results=[
                pb.ClassifyResult(
                    label=labels[int(np.argmax(row))], probabilities=dict(zip(labels, row.tolist(), strict=True))
                )
                for row in rows
            ]
        )


class ModelsService(rpc.ModelsServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        entry = model.entry
        quality = entry.manifest.get("quality", {})
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            task=model.task,
            vocabulary=entry.vocab or [],
            labels=entry.labels,
            num_layers=entry.num_layers,
            hidden_size=entry.hidden_size,
            num_directions=entry.num_directions,
            backend=model.backend.name,
            device=model.backend.device,
            quality=f"{quality.get('metric', '')} {quality.get('value', '')}".strip(),
        )

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self._info(m) for m in self.core.registry.models.values()])

    async def DescribeModel(self, request, context):
        return self._info(self.core.registry.get(request.model))


async def reap_idle_sessions(core: Core, every_s: float) -> None:
    """Close sessions idle longer than the timeout, forever."""
    while True:
        await asyncio.sleep(every_s)
        for session in core.sessions.expired():
            core.close(session.id)
