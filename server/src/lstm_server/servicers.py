"""The gRPC services: thin translations between protobuf messages and the engines.

Errors are raised as ``ServiceError`` and turned into statuses by the
interceptor (``interceptors.py``), which also authenticates every call:
``caller()`` is the tenant the call acts for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import numpy as np
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from .core import Core, check_proposed_id
from .errors import ServiceError
from .generation import GenerationEngine, Turn
from .interceptors import caller
from .registry import LoadedModel
from .requests import FINISH_REASON, check_prompt, from_tensor, invalid, to_tensor, unknown_policy
from .sessions import Session


def proposed_session_id(context) -> str:
    """The session id a client proposes on create or import (``x-session-id`` metadata), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-session-id":
            return check_proposed_id(value)
    return ""


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode() if seq else ""


def _after(token: str) -> int:
    """The position a page token continues after (0 for the first page)."""
    if not token:
        return 0
    with contextlib.suppress(ValueError):
        kind, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "after" and seq.isdigit():
            return int(seq)
    raise invalid("page_token is not one this server gave: pass the next_page_token of the previous page")


class SessionsService(rpc.SessionsServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def CreateSession(self, request, context):
        return self.core.session_proto(await self.core.create(request, caller(), proposed_session_id(context)))

    async def GetSession(self, request, context):
        return self.core.session_proto(await self.core.resolve(request.session_id, caller()))

    async def ListSessions(self, request, context):
        """The caller's sessions this process holds in memory, a page at a time (with a store, others may live
        in the store only)."""
        config = self.core.config
        if request.model:
            self.core.registry.get(request.model)
        if request.page_size < 0:
            raise invalid(
                f"page_size must be >= 0 (0: the default of {config.list_page_size}), got {request.page_size}"
            )
        size = min(request.page_size or config.list_page_size, config.list_max_page_size)
        page, last = self.core.sessions.page(caller(), request.model, _after(request.page_token), size)
        return pb.ListSessionsResponse(
            sessions=[self.core.session_proto(s) for s in page], next_page_token=_page_token(last)
        )

    async def ForkSession(self, request, context):
        return self.core.session_proto(await self.core.fork(request.session_id, caller()))

    async def CloseSession(self, request, context):
        await self.core.close(request.session_id, caller())
        return pb.CloseSessionResponse()

    async def ExportSession(self, request, context):
        return self.core.state_of(await self.core.resolve_idle(request.session_id, caller()))

    async def ImportSession(self, request, context):
        session = self.core.session_from_state(request.state, caller(), proposed_session_id(context))
        return self.core.session_proto(await self.core.save_new(session))


class GenerationService(rpc.GenerationServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        turn = await self.core.start_turn(
            request.session_id, caller(), request.prompt, request.sampling, request.unknown_characters
        )
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
        """A session opened by the stream (``create``) is closed when the stream ends, however it ends, unless
        the first message sets ``keep_session``; a session named by ``session_id`` outlives the stream."""
        tenant = caller()
        session: Session | None = None
        owned = False  # opened by this stream, and closed with it
        current: list[Turn] = []  # the running turn, cancelled if the call ends under it
        context.add_done_callback(lambda _: current and current[-1].cancel())
        try:
            async for message in request_iterator:
                which = message.WhichOneof("session")
                if session is None:
                    if which == "create":
                        session = await self.core.create(message.create, tenant, proposed_session_id(context))
                        owned = not message.keep_session
                    elif which == "session_id":
                        session = await self.core.resolve(message.session_id, tenant)
                    else:
                        raise invalid("the first Chat message must name a session (session_id) or create one (create)")
                    if not message.text:
                        yield pb.ChatResponse(session_id=session.id, end_of_turn=True, tokens_seen=session.tokens_seen)
                        continue
                elif which is not None or message.keep_session:
                    raise invalid("only the first Chat message may name or create the session, or keep it")
                turn = await self.core.start_turn(
                    session.id, tenant, message.text, message.sampling, pb.UNKNOWN_CHARACTERS_REJECT
                )
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
        finally:
            if owned:
                with contextlib.suppress(ServiceError):  # closed already, or the store is down (it expires)
                    await asyncio.shield(self.core.close(session.id, tenant))  # even if the call is cancelled

    async def Step(self, request, context):
        model = self.core.registry.of_task(request.model, "generation")
        engine: GenerationEngine = model.engine
        which = request.WhichOneof("input")
        if which == "text":
            check_prompt(request.text, self.core.config, "text")
            ids = engine.codec.encode(request.text, unknown_policy(request.unknown_characters))
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
