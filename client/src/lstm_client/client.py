"""The synchronous client: ``Client`` and its ``Session``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from .errors import LstmError, from_rpc_error
from .results import (
    UNKNOWN,
    Chunk,
    ClassifyResult,
    StepResult,
    chunk_of,
    classify_results,
    create_request,
    generate_request,
    replica_of,
    session_metadata,
)
from .tensors import TensorLike, as_tensor
from .transport import Metadata, TlsConfig, auth_metadata, open_channel

RETRYABLE = grpc.StatusCode.UNAVAILABLE


class PageTokens:
    """Follows ``next_page_token`` from page to page; refuses a token the server already gave (a loop)."""

    def __init__(self) -> None:
        self.token = ""
        self._seen: set[str] = set()

    def advance(self, next_token: str) -> bool:
        """Whether there is another page to ask for (with ``self.token``)."""
        if not next_token:
            return False
        if next_token in self._seen:
            raise LstmError(f"the server repeated the page token {next_token!r}", grpc.StatusCode.INTERNAL)
        self._seen.add(next_token)
        self.token = next_token
        return True


def backoff_delays(retries: int, base: float) -> Iterator[float]:
    """Exponential backoff with full jitter: the waits before retries 1..n."""
    for attempt in range(retries):
        yield random.uniform(0, base * 2**attempt)


class Connection:
    """What the sync and asyncio clients share: the channel, the stubs, the token and the call rules."""

    asyncio = False  # whether the channel is a grpc.aio one (AsyncClient)

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        timeout: float | None = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self._auth = auth_metadata(token)  # checked before the channel is made
        self.channel = open_channel(target, tls=tls, token=token, options=options, asyncio=self.asyncio)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sessions = rpc.SessionsStub(self.channel)
        self.generation = rpc.GenerationStub(self.channel)
        self.classification = rpc.ClassificationStub(self.channel)
        self.models_stub = rpc.ModelsStub(self.channel)
        self.last_replica: str | None = None

    def metadata(self, extra: Metadata | None = None) -> Metadata:
        """``extra`` plus the token's ``authorization`` metadata: what every call of this client sends (pass it
        when calling the stubs directly)."""
        return (*(extra or ()), *self._auth)


class Client(Connection):
    """A connection to an lstm-server (or a gateway in front of several).

    ``token``: sent as ``authorization: Bearer <token>`` with every call (the server maps it to a tenant).
    ``tls``: ``True`` for TLS with gRPC's default roots, a ``TlsConfig`` for a private CA, a client certificate
    (mutual TLS) or a server name override; ``None`` (default) for plaintext. A token over plaintext is only for a
    server on loopback (an ``InsecureTokenWarning`` says so otherwise).
    ``timeout`` is the default deadline in seconds of every unary call; idempotent calls (classify, step,
    describe, get, list, export) are retried ``retries`` times with backoff (``backoff`` seconds, doubling, with
    jitter) when the server is UNAVAILABLE. ``options`` are gRPC channel options. Failures raise ``LstmError``
    subclasses carrying the status code.
    """

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
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
            try:
                response, call = method.with_call(
                    request, timeout=timeout or self.timeout, metadata=self.metadata(metadata)
                )
                self.last_replica = replica_of(call.initial_metadata()) or self.last_replica
                return response
            except grpc.RpcError as error:
                delay = next(delays, None) if error.code() == RETRYABLE else None
                if delay is None:
                    raise from_rpc_error(error) from None
                time.sleep(delay)

    # -- stateless calls -----------------------------------------------------

    def classify(
        self, texts: list[str], model: str = "sentiment", timeout: float | None = None
    ) -> list[ClassifyResult]:
        request = pb.ClassifyRequest(model=model, texts=texts)
        return classify_results(self.call(self.classification.Classify, request, idempotent=True, timeout=timeout))

    def step(
        self,
        model: str,
        text: str | None = None,
        tokens: list[int] | None = None,
        state: tuple[TensorLike, TensorLike] | None = None,
        unknown_characters: str = "reject",
    ) -> StepResult:
        """Read ``text`` (or token ids) from ``state`` (h, c; default zeros): the next-character distribution and
        the new state. ``state`` is a previous ``StepResult.state`` or plain ``(values, shape)`` pairs."""
        request = pb.StepRequest(model=model, unknown_characters=UNKNOWN[unknown_characters])
        if tokens is not None:
            request.tokens.ids.extend(tokens)
        else:
            request.text = text or ""
        if state is not None:
            request.h.CopyFrom(as_tensor(state[0]))
            request.c.CopyFrom(as_tensor(state[1]))
        response = self.call(self.generation.Step, request, idempotent=True)
        return StepResult(list(response.probabilities), response.h, response.c)

    def models(self) -> list[pb.ModelInfo]:
        return list(self.call(self.models_stub.ListModels, pb.ListModelsRequest(), idempotent=True).models)

    def describe(self, model: str) -> pb.ModelInfo:
        return self.call(self.models_stub.DescribeModel, pb.DescribeModelRequest(model=model), idempotent=True)

    # -- sessions --------------------------------------------------------------

    def session(
        self, model: str = "charlm", prompt: str = "", unknown_characters: str = "reject", **defaults: Any
    ) -> Session:
        """A new session (closed when used as a context manager); ``defaults`` are sampling parameters."""
        request = create_request(model, prompt, unknown_characters, defaults)
        info = self.call(self.sessions.CreateSession, request, idempotent=False, metadata=session_metadata())
        return Session(self, info)

    def attach(self, session_id: str) -> Session:
        """An existing session, by id."""
        request = pb.GetSessionRequest(session_id=session_id)
        return Session(
            self, self.call(self.sessions.GetSession, request, idempotent=True, metadata=session_metadata(session_id))
        )

    def import_session(self, state: pb.SessionState) -> Session:
        request = pb.ImportSessionRequest(state=state)
        return Session(
            self, self.call(self.sessions.ImportSession, request, idempotent=False, metadata=session_metadata())
        )

    def list_sessions(self, model: str = "", page_size: int = 0) -> list[pb.Session]:
        """The caller's sessions (of ``model``, or all), oldest first: every page, ``page_size`` sessions per call
        (0: the server's default)."""
        found: list[pb.Session] = []
        pages = PageTokens()
        while True:
            request = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=pages.token)
            response = self.call(self.sessions.ListSessions, request, idempotent=True)
            found.extend(response.sessions)
            if not pages.advance(response.next_page_token):
                return found


class Session:
    """A server-held session: its text so far lives in the server's (h, c)."""

    def __init__(self, client: Client, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.last_replica: str | None = client.last_replica
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def _metadata(self) -> Metadata:
        return session_metadata(self.id)

    def _unary(self, method, request, idempotent: bool):
        response = self.client.call(method, request, idempotent=idempotent, metadata=self._metadata())
        self.last_replica = self.client.last_replica
        return response

    def generate(
        self, prompt: str = "", *, timeout: float | None = None, unknown_characters: str = "reject", **sampling: Any
    ) -> Iterator[Chunk]:
        """Append ``prompt``, then stream the generated characters (sampling: temperature, top_k, top_p,
        seed, max_tokens, stop). Leaving the loop early cancels the turn."""
        request = generate_request(self.id, prompt, unknown_characters, sampling)
        call = self.client.generation.Generate(
            request, timeout=timeout, metadata=self.client.metadata(self._metadata())
        )
        try:
            self.last_replica = replica_of(call.initial_metadata()) or self.last_replica
            for response in call:
                yield chunk_of(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def refresh(self) -> pb.Session:
        self.info = self._unary(self.client.sessions.GetSession, pb.GetSessionRequest(session_id=self.id), True)
        return self.info

    def fork(self) -> Session:
        info = self._unary(self.client.sessions.ForkSession, pb.ForkSessionRequest(session_id=self.id), False)
        return Session(self.client, info)

    def export(self) -> pb.SessionState:
        return self._unary(self.client.sessions.ExportSession, pb.ExportSessionRequest(session_id=self.id), True)

    def close(self) -> None:
        try:
            self._unary(self.client.sessions.CloseSession, pb.CloseSessionRequest(session_id=self.id), False)
        finally:
            self.closed = True


__all__ = ["Client", "LstmError", "Session", "TlsConfig"]
