"""The asyncio client: ``AsyncClient``, ``AsyncSession`` and ``AsyncChat``, the twins of ``Client``, ``Session``
and ``Chat``: the same methods and results, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

import grpc
from lstm.v1 import lstm_pb2 as pb

from .chat import ChatState, chat_opening
from .client import Connection, PageTokens, log
from .errors import LstmError, from_rpc_error
from .resend import Deadline, unchanged, wait_before, worth_resending
from .results import (
    Chunk,
    ClassifyResult,
    StepResult,
    chunk_of,
    classify_results,
    create_request,
    generate_request,
    replica_of,
    session_metadata,
    step_request,
    step_result,
)
from .tensors import TensorLike
from .transport import Metadata

Closable = TypeVar("Closable", "AsyncSession", "AsyncChat")


class Opening(Generic[Closable]):
    """What ``AsyncClient.session`` and ``chat`` return: ``await`` it (or ``await opening.open()``) for the
    object, or ``async with`` it to have it closed at the end of the block."""

    def __init__(self, open_: Callable[[], Awaitable[Closable]]) -> None:
        self._open = open_
        self._opened: Closable | None = None

    async def open(self) -> Closable:
        return await self._open()

    def __await__(self) -> Generator[Any, None, Closable]:
        return self.open().__await__()

    async def __aenter__(self) -> Closable:
        self._opened = await self._open()
        return self._opened

    async def __aexit__(self, *exc: object) -> None:
        await self._opened.__aexit__(*exc)


class AsyncClient(Connection):
    """``async with AsyncClient("localhost:50051", token=..., tls=...) as client: ...``; the same settings, rules
    and methods as ``Client``."""

    asyncio = True

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Any:
        """One unary call with the token, the deadline and typed errors; records the replica. An idempotent call
        lost mid-call is resent (resend.py)."""
        deadline, attempt = Deadline(self.deadline(timeout)), 0
        while True:
            call = method(request, timeout=deadline.remaining(), metadata=self.metadata(metadata))
            try:
                response = await call
                self.last_replica = replica_of(await call.initial_metadata()) or self.last_replica
                return response
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            if not self._may_resend_call(method, failure, attempt, deadline):
                raise failure from None
            await asyncio.sleep(wait_before(attempt, self.backoff))
            attempt += 1

    async def classify(
        self, texts: list[str], model: str = "sentiment", timeout: float | None = None
    ) -> list[ClassifyResult]:
        request = pb.ClassifyRequest(model=model, texts=texts)
        return classify_results(await self.call(self.classification.Classify, request, timeout=timeout))

    async def step(
        self,
        model: str,
        text: str | None = None,
        tokens: list[int] | None = None,
        state: tuple[TensorLike, TensorLike] | None = None,
        unknown_characters: str = "reject",
    ) -> StepResult:
        """See ``Client.step``."""
        request = step_request(model, text, tokens, state, unknown_characters)
        return step_result(await self.call(self.generation.Step, request))

    async def models(self) -> list[pb.ModelInfo]:
        return list((await self.call(self.models_stub.ListModels, pb.ListModelsRequest())).models)

    async def describe(self, model: str) -> pb.ModelInfo:
        return await self.call(self.models_stub.DescribeModel, pb.DescribeModelRequest(model=model))

    def session(
        self, model: str = "charlm", prompt: str = "", unknown_characters: str = "reject", **defaults: Any
    ) -> Opening[AsyncSession]:
        """A new session: ``await`` it, or ``async with`` it to close it at the end."""
        request = create_request(model, prompt, unknown_characters, defaults)

        async def create() -> AsyncSession:
            info = await self.call(self.sessions.CreateSession, request, metadata=session_metadata())
            return AsyncSession(self, info)

        return Opening(create)

    async def attach(self, session_id: str) -> AsyncSession:
        """An existing session, by id."""
        request = pb.GetSessionRequest(session_id=session_id)
        return AsyncSession(
            self, await self.call(self.sessions.GetSession, request, metadata=session_metadata(session_id))
        )

    async def import_session(self, state: pb.SessionState) -> AsyncSession:
        request = pb.ImportSessionRequest(state=state)
        return AsyncSession(self, await self.call(self.sessions.ImportSession, request, metadata=session_metadata()))

    async def list_sessions(self, model: str = "", page_size: int = 0) -> list[pb.Session]:
        """The caller's sessions (of ``model``, or all), oldest first, every page (see ``Client.list_sessions``)."""
        found: list[pb.Session] = []
        pages = PageTokens()
        while True:
            request = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=pages.token)
            response = await self.call(self.sessions.ListSessions, request)
            found.extend(response.sessions)
            if not pages.advance(response.next_page_token):
                return found

    def chat(
        self,
        model: str = "charlm",
        prompt: str = "",
        *,
        keep_session: bool = False,
        timeout: float | None = None,
        unknown_characters: str = "reject",
        **defaults: Any,
    ) -> Opening[AsyncChat]:
        """See ``Client.chat``: ``await`` it, or ``async with`` it to close the stream at the end."""
        opening = chat_opening(model, prompt, unknown_characters, defaults, keep_session)
        return Opening(AsyncChat(self, opening, timeout).open)


class AsyncSession:
    """The twin of ``Session``."""

    def __init__(self, client: AsyncClient, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.last_replica: str | None = client.last_replica
        self.tokens_seen = info.tokens_seen  # as in ``Session``
        self.closed = False

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.closed:
            await self.close()

    async def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        response = await self.client.call(method, request, metadata=session_metadata(self.id))
        self.last_replica = self.client.last_replica
        return response

    async def generate(
        self, prompt: str = "", *, timeout: float | None = None, unknown_characters: str = "reject", **sampling: Any
    ) -> AsyncIterator[Chunk]:
        """See ``Session.generate``."""
        request = generate_request(self.id, prompt, unknown_characters, sampling)
        deadline, before, attempt = Deadline(self.client.deadline(timeout)), self.tokens_seen, 0
        while True:
            call = self.client.generation.Generate(
                request, timeout=deadline.remaining(), metadata=self.client.metadata(session_metadata(self.id))
            )
            received = False
            try:
                self.last_replica = replica_of(await call.initial_metadata()) or self.last_replica
                async for response in call:
                    received = True
                    chunk = chunk_of(response)
                    self.tokens_seen = chunk.tokens_seen
                    yield chunk
                return
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            finally:
                call.cancel()
            if not await self._may_resend(failure, received, attempt, deadline, before):
                raise failure from None
            attempt += 1

    async def _may_resend(
        self, failure: LstmError, received: bool, attempt: int, deadline: Deadline, before: int
    ) -> bool:
        """See ``Session._may_resend``."""
        if not worth_resending(failure, received, attempt, self.client.retries, deadline):
            return False
        await asyncio.sleep(wait_before(attempt, self.client.backoff))
        try:
            info = await self.refresh()
        except LstmError:
            return False
        if not unchanged(info, before) or deadline.passed():
            return False
        log.info("resending the turn on session %s (%s)", self.id, failure)
        return True

    def chat(self, *, timeout: float | None = None) -> Opening[AsyncChat]:
        """See ``Session.chat``."""
        return Opening(AsyncChat(self.client, pb.ChatRequest(session_id=self.id), timeout).open)

    async def refresh(self) -> pb.Session:
        self.info = await self._unary(self.client.sessions.GetSession, pb.GetSessionRequest(session_id=self.id))
        self.tokens_seen = self.info.tokens_seen
        return self.info

    async def fork(self) -> AsyncSession:
        request = pb.ForkSessionRequest(session_id=self.id)
        return AsyncSession(self.client, await self._unary(self.client.sessions.ForkSession, request))

    async def export(self) -> pb.SessionState:
        return await self._unary(self.client.sessions.ExportSession, pb.ExportSessionRequest(session_id=self.id))

    async def close(self) -> None:
        try:
            await self._unary(self.client.sessions.CloseSession, pb.CloseSessionRequest(session_id=self.id))
        finally:
            self.closed = True


class AsyncChat:
    """The twin of ``Chat``: ``async for chunk in chat.send(text)``."""

    def __init__(self, client: AsyncClient, opening: pb.ChatRequest, timeout: float | None) -> None:
        self.client = client
        self._state = ChatState(opening)
        self._timeout = client.deadline(timeout)
        self._call: Any = None

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def tokens_seen(self) -> int:
        return self._state.tokens_seen

    async def open(self) -> AsyncChat:
        """Start the stream with the opening message and read the server's reply (the session's id and count)."""
        await self._write(self._state.opening)
        async for _ in self._answer():
            pass
        return self

    async def __aenter__(self) -> AsyncChat:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.cancel()

    async def _write(self, request: pb.ChatRequest) -> None:
        """Send ``request`` on the stream, opening one (with the session's ``x-session-id``) if none is open."""
        if self._call is None:
            metadata = self.client.metadata(self._state.metadata())
            self._call = self.client.generation.Chat(timeout=self._timeout, metadata=metadata)
        try:
            await self._call.write(request)
        except grpc.RpcError as error:
            self.cancel()
            raise from_rpc_error(error) from None

    async def send(self, text: str, **sampling: Any) -> AsyncIterator[Chunk]:
        """See ``Chat.send``."""
        await self._write(self._state.turn(text, sampling, new_stream=self._call is None))
        async for chunk in self._answer():
            yield chunk

    async def _answer(self) -> AsyncIterator[Chunk]:
        call, finished = self._call, False
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                finished = response.end_of_turn
                yield self._state.read(response)
                if finished:
                    return
            raise LstmError("the Chat stream ended in the middle of an answer", grpc.StatusCode.INTERNAL)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            if not finished and self._call is call:  # not a later stream, when an abandoned answer is collected
                self.cancel()

    def cancel(self) -> None:
        """End the stream now, with its running turn."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self) -> None:
        """End the stream after the last answer (the server then closes a session the stream owns)."""
        if self._call is None:
            return
        call, self._call = self._call, None
        try:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
