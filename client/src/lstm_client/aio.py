"""The asyncio client: ``AsyncClient`` and its ``AsyncSession``, the twins of ``Client`` and ``Session``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from lstm.v1 import lstm_pb2 as pb

from .client import RETRYABLE, Connection, PageTokens, backoff_delays
from .errors import from_rpc_error
from .results import (
    Chunk,
    ClassifyResult,
    chunk_of,
    classify_results,
    create_request,
    generate_request,
    replica_of,
    session_metadata,
)
from .transport import Metadata


class AsyncClient(Connection):
    """``async with AsyncClient("localhost:50051", token=..., tls=...) as client: ...``; the same settings and
    rules as ``Client``."""

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
        idempotent: bool,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Any:
        """One unary call with the token, the deadline, the retry rule and typed errors; records the replica."""
        delays = backoff_delays(self.retries if idempotent else 0, self.backoff)
        while True:
            call = method(request, timeout=timeout or self.timeout, metadata=self.metadata(metadata))
            try:
                response = await call
                self.last_replica = replica_of(await call.initial_metadata()) or self.last_replica
                return response
            except grpc.RpcError as error:
                delay = next(delays, None) if error.code() == RETRYABLE else None
                if delay is None:
                    raise from_rpc_error(error) from None
                await asyncio.sleep(delay)

    async def classify(
        self, texts: list[str], model: str = "sentiment", timeout: float | None = None
    ) -> list[ClassifyResult]:
        request = pb.ClassifyRequest(model=model, texts=texts)
        return classify_results(
            await self.call(self.classification.Classify, request, idempotent=True, timeout=timeout)
        )

    async def models(self) -> list[pb.ModelInfo]:
        return list((await self.call(self.models_stub.ListModels, pb.ListModelsRequest(), idempotent=True)).models)

    async def list_sessions(self, model: str = "", page_size: int = 0) -> list[pb.Session]:
        """The caller's sessions (of ``model``, or all), oldest first, every page (see ``Client.list_sessions``)."""
        found: list[pb.Session] = []
        pages = PageTokens()
        while True:
            request = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=pages.token)
            response = await self.call(self.sessions.ListSessions, request, idempotent=True)
            found.extend(response.sessions)
            if not pages.advance(response.next_page_token):
                return found

    def session(
        self, model: str = "charlm", prompt: str = "", unknown_characters: str = "reject", **defaults: Any
    ) -> AsyncSession:
        """Use as ``async with client.session(...) as session``: created on entry, closed on exit."""
        request = create_request(model, prompt, unknown_characters, defaults)
        return AsyncSession(self, request)


class AsyncSession:
    def __init__(self, client: AsyncClient, create: pb.CreateSessionRequest) -> None:
        self.client = client
        self._create = create
        self.info: pb.Session | None = None
        self.id = ""
        self.last_replica: str | None = None

    async def open(self) -> AsyncSession:
        self.info = await self.client.call(
            self.client.sessions.CreateSession, self._create, idempotent=False, metadata=session_metadata()
        )
        self.id = self.info.session_id
        self.last_replica = self.client.last_replica
        return self

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _metadata(self) -> Metadata:
        return session_metadata(self.id)

    async def generate(
        self, prompt: str = "", *, timeout: float | None = None, unknown_characters: str = "reject", **sampling: Any
    ) -> AsyncIterator[Chunk]:
        request = generate_request(self.id, prompt, unknown_characters, sampling)
        call = self.client.generation.Generate(
            request, timeout=timeout, metadata=self.client.metadata(self._metadata())
        )
        try:
            self.last_replica = replica_of(await call.initial_metadata()) or self.last_replica
            async for response in call:
                yield chunk_of(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def refresh(self) -> pb.Session:
        request = pb.GetSessionRequest(session_id=self.id)
        self.info = await self.client.call(
            self.client.sessions.GetSession, request, idempotent=True, metadata=self._metadata()
        )
        return self.info

    async def close(self) -> None:
        request = pb.CloseSessionRequest(session_id=self.id)
        await self.client.call(self.client.sessions.CloseSession, request, idempotent=False, metadata=self._metadata())
