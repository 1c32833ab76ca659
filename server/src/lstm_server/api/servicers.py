"""The gRPC services: thin translations between protobuf messages and the layers below.

A call on a session goes to the sessions layer (``SessionManager``); the
stateless calls (Step, Classify, the model list) go to the served models'
engines directly. Errors are raised as ``ServiceError`` and turned into
statuses by the interceptor (``interceptors.py``), which also authenticates
every call: ``caller()`` is the tenant the call acts for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from ..config import ServerConfig
from ..engine.faults import RowFailed
from ..engine.models import ServedModel, ServedModels
from ..engine.turn import Chunk
from ..errors import ServiceError, invalid
from ..sessions.failures import step_error
from ..sessions.manager import SessionManager
from ..sessions.session import Session
from ..sessions.turn import TurnStream
from .interceptors import caller
from .messages import (
    finish_reason,
    from_tensor,
    page_after,
    page_token,
    sampling_dict,
    session_message,
    to_tensor,
)
from .requests import check_classify, check_prompt, page_size, proposed_session_id, unknown_policy
from .state import StateMessages

Context = grpc.aio.ServicerContext


@dataclass
class Api:
    """What the services share: the configuration, the sessions layer, the served models, the state messages;
    and the steps two services take alike."""

    config: ServerConfig
    sessions: SessionManager
    models: ServedModels
    states: StateMessages

    def session_message(self, session: Session) -> pb.Session:
        return session_message(session, self.models.get(session.model).version)

    async def create(self, request: pb.CreateSessionRequest, tenant: str, session_id: str) -> Session:
        model = self.models.of_task(request.model, "generation")
        check_prompt(request.prompt, self.config)
        tokens = model.engine.codec.encode(request.prompt, unknown_policy(request.unknown_characters))
        return await self.sessions.create(model, tokens, sampling_dict(request.defaults), tenant, session_id)

    async def start_turn(
        self, session_id: str, tenant: str, prompt: str, sampling: pb.SamplingParams, policy: int
    ) -> TurnStream:
        """Find the session, check and encode the prompt with its model's codec, and start the turn. A session
        still settling a turn whose caller left (cancelled) is waited for, not refused as busy."""
        session = await self.sessions.resolve(session_id, tenant)
        if session.turn is not None and await session.turn.settled_after_caller_left():
            session = await self.sessions.resolve(session_id, tenant)  # as that turn left it
        engine = self.models.get(session.model).engine
        check_prompt(prompt, self.config)
        tokens = engine.codec.encode(prompt, unknown_policy(policy))
        await self.sessions.fetch_prefix(session, tokens)
        return self.sessions.start_turn(session, tokens, sampling_dict(sampling))

    async def stream(self, turn: TurnStream, close: tuple[str, str] | None = None) -> AsyncIterator[Chunk]:
        """The turn's chunks, for any service; ``close`` (session id, tenant): close that session before the last
        chunk goes out (a request that opened it for itself), or as the caller leaves early. The turn stops when
        the caller leaves."""
        try:
            async for chunk in turn.chunks():
                if chunk.end is not None and close is not None:
                    await self.close_quietly(*close)
                    close = None
                yield chunk
        finally:
            turn.close()
            if close is not None:
                await self.close_quietly(*close)

    async def classify(self, model: ServedModel, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Each text's label and its probabilities [texts, labels] in label order, for any service."""
        check_classify(texts, self.config)
        rows = await model.engine.classify(texts)
        return [model.entry.labels[int(np.argmax(row))] for row in rows], rows

    async def close_quietly(self, session_id: str, tenant: str) -> None:
        """Close a session a stream or request owned, even if the call is cancelled; one closed already, or a
        store that is down (the session expires there), is no error."""
        with contextlib.suppress(ServiceError):
            await asyncio.shield(self.sessions.close(session_id, tenant))


class SessionsService(rpc.SessionsServicer):
    def __init__(self, api: Api) -> None:
        self.api = api

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        return self.api.session_message(await self.api.create(request, caller(), proposed_session_id(context)))

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        return self.api.session_message(await self.api.sessions.resolve(request.session_id, caller()))

    async def ListSessions(self, request: pb.ListSessionsRequest, context: Context) -> pb.ListSessionsResponse:
        """The caller's sessions this process holds in memory, a page at a time (with a store, others may live
        in the store only)."""
        if request.model:
            self.api.models.get(request.model)
        size = page_size(request.page_size, self.api.config)
        page, last = self.api.sessions.list_sessions(caller(), request.model, page_after(request.page_token), size)
        return pb.ListSessionsResponse(
            sessions=[self.api.session_message(s) for s in page], next_page_token=page_token(last)
        )

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Context) -> pb.Session:
        return self.api.session_message(await self.api.sessions.fork(request.session_id, caller()))

    async def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        await self.api.sessions.close(request.session_id, caller())
        return pb.CloseSessionResponse()

    async def ExportSession(self, request: pb.ExportSessionRequest, context: Context) -> pb.SessionState:
        return self.api.states.message(await self.api.sessions.export(request.session_id, caller()))

    async def ImportSession(self, request: pb.ImportSessionRequest, context: Context) -> pb.Session:
        tenant, session_id = caller(), proposed_session_id(context)
        state = self.api.states.state(request.state, tenant)
        return self.api.session_message(await self.api.sessions.import_session(state, tenant, session_id))


class GenerationService(rpc.GenerationServicer):
    def __init__(self, api: Api) -> None:
        self.api = api

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        turn = await self.api.start_turn(
            request.session_id, caller(), request.prompt, request.sampling, request.unknown_characters
        )
        context.add_done_callback(lambda _: turn.cancel())
        async with contextlib.aclosing(self.api.stream(turn)) as chunks:
            async for chunk in chunks:
                yield pb.GenerateResponse(
                    text=chunk.text, tokens_seen=chunk.tokens_seen, finish_reason=finish_reason(chunk.end)
                )

    async def Chat(
        self, request_iterator: AsyncIterator[pb.ChatRequest], context: Context
    ) -> AsyncIterator[pb.ChatResponse]:
        """A session opened by the stream (``create``) is closed when the stream ends, however it ends, unless
        the first message sets ``keep_session``; a session named by ``session_id`` outlives the stream."""
        tenant = caller()
        session: Session | None = None
        owned = False  # opened by this stream, and closed with it
        current: list[TurnStream] = []  # the running turn, cancelled if the call ends under it
        context.add_done_callback(lambda _: current and current[-1].cancel())
        try:
            async for message in request_iterator:
                which = message.WhichOneof("session")
                if session is None:
                    if which == "create":
                        session = await self.api.create(message.create, tenant, proposed_session_id(context))
                        owned = not message.keep_session
                    elif which == "session_id":
                        session = await self.api.sessions.resolve(message.session_id, tenant)
                    else:
                        raise invalid(
                            "the first Chat message must name a session (session_id) or create one (create)",
                            reason="CHAT_WITHOUT_SESSION",
                            field="session",
                        )
                    if not message.text:
                        yield pb.ChatResponse(session_id=session.id, end_of_turn=True, tokens_seen=session.tokens_seen)
                        continue
                elif which is not None or message.keep_session:
                    raise invalid(
                        "only the first Chat message may name or create the session, or keep it",
                        reason="CHAT_SESSION_RENAMED",
                        field="session" if which is not None else "keep_session",
                    )
                turn = await self.api.start_turn(
                    session.id, tenant, message.text, message.sampling, pb.UNKNOWN_CHARACTERS_REJECT
                )
                current[:] = [turn]
                async with contextlib.aclosing(self.api.stream(turn)) as chunks:
                    async for chunk in chunks:
                        yield pb.ChatResponse(
                            session_id=session.id,
                            text=chunk.text,
                            end_of_turn=chunk.end is not None,
                            finish_reason=finish_reason(chunk.end),
                            tokens_seen=chunk.tokens_seen,
                        )
        finally:
            if owned:
                await self.api.close_quietly(session.id, tenant)

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        model = self.api.models.of_task(request.model, "generation")
        engine = model.engine
        which = request.WhichOneof("input")
        if which == "text":
            check_prompt(request.text, self.api.config, "text")
            tokens = engine.codec.encode(request.text, unknown_policy(request.unknown_characters))
        elif which == "tokens":
            check_prompt(list(request.tokens.ids), self.api.config, "tokens")
            tokens = engine.codec.validate_ids(list(request.tokens.ids))
        else:
            tokens = np.zeros(0, np.int64)
        if not len(tokens):
            raise invalid("Step needs a non-empty text or token list", reason="EMPTY_INPUT", field="input")
        shape = engine.slots.slot_shape
        if request.HasField("h") != request.HasField("c"):
            raise invalid(
                "give both h and c, or neither (a fresh sequence)",
                reason="PARTIAL_STATE",
                field="h" if request.HasField("c") else "c",
            )
        h = c = None  # a fresh state: read through the caller's prefix cache
        if request.HasField("h"):
            h, c = from_tensor(request.h, shape, "h"), from_tensor(request.c, shape, "c")
        try:
            probabilities, h, c = await engine.step(tokens, h, c, caller())
        except RowFailed as failed:
            raise step_error(failed.failure) from failed.failure.cause
        return pb.StepResponse(h=to_tensor(h), c=to_tensor(c), probabilities=probabilities.tolist())


class ClassificationService(rpc.ClassificationServicer):
    def __init__(self, api: Api) -> None:
        self.api = api

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        model = self.api.models.of_task(request.model, "classification")
        labels, rows = await self.api.classify(model, list(request.texts))
        names = model.entry.labels
        return pb.ClassifyResponse(
            results=[
                pb.ClassifyResult(label=label, probabilities=dict(zip(names, row.tolist(), strict=True)))
                for label, row in zip(labels, rows, strict=True)
            ]
        )


class ModelsService(rpc.ModelsServicer):
    def __init__(self, api: Api) -> None:
        self.api = api

    def _info(self, model: ServedModel) -> pb.ModelInfo:
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

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._info(m) for m in self.api.models.all()])

    async def DescribeModel(self, request: pb.DescribeModelRequest, context: Context) -> pb.ModelInfo:
        return self._info(self.api.models.get(request.model))

    async def ListPrefixCache(self, request: pb.ListPrefixCacheRequest, context: Context) -> pb.ListPrefixCacheResponse:
        """The caller's own prefix cache entries of a language model, shortest opening first (at most
        ``list_max_page_size``)."""
        engine = self.api.models.of_task(request.model, "generation").engine
        entries = await engine.cache_entries(caller(), self.api.config.list_max_page_size)
        return pb.ListPrefixCacheResponse(
            entries=[
                pb.PrefixCacheEntry(
                    characters=e.characters,
                    preview=engine.codec.decode(e.preview),
                    bytes=e.bytes,
                    hits=e.hits,
                    idle_seconds=e.idle_s,
                )
                for e in entries
            ]
        )

    async def ClearPrefixCache(
        self, request: pb.ClearPrefixCacheRequest, context: Context
    ) -> pb.ClearPrefixCacheResponse:
        """Forget the caller's own prefix cache entries of a language model."""
        model = self.api.models.of_task(request.model, "generation")
        cleared, stored = await self.api.sessions.clear_prefixes(model, caller())
        return pb.ClearPrefixCacheResponse(cleared=cleared, cleared_store=stored)
