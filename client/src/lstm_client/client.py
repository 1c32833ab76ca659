"""The synchronous client: ``Client`` and its ``Session``; ``Connection`` holds what it shares with ``AsyncClient``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from .chat import Chat, chat_opening
from .errors import LstmError, from_rpc_error
from .resend import Deadline, lost_mid_call, unchanged, wait_before, worth_resending
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
from .transport import (
    IDEMPOTENT,
    Metadata,
    TlsConfig,
    auth_metadata,
    check_timeout,
    merge_options,
    open_channel,
    retry_options,
)

log = logging.getLogger("lstm_client")


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


class Connection:
    """What the sync and asyncio clients share: the channel (with its retry policy), the stubs, the token and the
    deadline."""

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
        self.timeout = check_timeout(timeout)
        all_options = merge_options(options, retry_options(retries, backoff))
        self.retries, self.backoff = retries, backoff  # also the resends of a generate turn (resend.py)
        self.channel = open_channel(target, tls=tls, token=token, options=all_options, asyncio=self.asyncio)
        self.sessions = rpc.SessionsStub(self.channel)
        self.generation = rpc.GenerationStub(self.channel)
        self.classification = rpc.ClassificationStub(self.channel)
        self.models_stub = rpc.ModelsStub(self.channel)
        stubs = {
            "lstm.v1.Classification": self.classification,
            "lstm.v1.Generation": self.generation,
            "lstm.v1.Models": self.models_stub,
            "lstm.v1.Sessions": self.sessions,
        }
        # resent by ``call`` when lost mid-call (resend.py)
        self._idempotent = {getattr(stubs[service], name) for service, names in IDEMPOTENT.items() for name in names}
        self.last_replica: str | None = None

    def metadata(self, extra: Metadata | None = None) -> Metadata:
        """``extra`` plus the token's ``authorization`` metadata: what every call of this client sends (pass it
        when calling the stubs directly)."""
        return (*(extra or ()), *self._auth)

    def deadline(self, timeout: float | None) -> float | None:
        """A call's deadline in seconds: its own ``timeout`` if given, else the client's (``None``: none)."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def _may_resend_call(
        self, method: Callable[..., Any], failure: LstmError, attempt: int, deadline: Deadline
    ) -> bool:
        """Whether a unary call that failed with ``failure`` goes again (resend.py), before the wait."""
        resend = method in self._idempotent and lost_mid_call(failure) and attempt < self.retries
        if resend and not deadline.passed():
            log.info("resending a call that was lost mid-call (%s)", failure)
            return True
        return False


class Client(Connection):
    """A connection to an lstm-server (or a gateway in front of several).

    ``token``: sent as ``authorization: Bearer <token>`` with every call (the server maps it to a tenant).
    ``tls``: ``True`` for TLS with gRPC's default roots, a ``TlsConfig`` for a private CA, a client certificate
    (mutual TLS) or a server name override; ``None`` (default) for plaintext. A token over plaintext is only for a
    server on loopback (an ``InsecureTokenWarning`` says so otherwise).
    ``timeout``: the deadline in seconds of every call, streams included (a whole ``generate`` turn, a whole
    ``chat`` stream); ``None`` for no deadline; 0 or less is a ``ValueError``. Methods that take ``timeout=``
    override it for their call.
    ``retries`` (0 to 4) and ``backoff``: gRPC's own retry policy resends the idempotent calls (classify, step,
    models, describe, attach/refresh, list_sessions, export) when the server is UNAVAILABLE, up to ``retries``
    more times after random waits of up to ``backoff`` seconds, doubling; a ``generate`` turn is resent as often,
    only under ``resend.py``'s conditions (no character arrived, the session unchanged). ``options`` are gRPC
    channel options (a ``grpc.service_config`` there replaces that policy). Failures raise ``LstmError``
    subclasses."""

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
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Any:
        """One unary call with the token, the deadline and typed errors; records the replica. An idempotent call
        lost mid-call is resent (resend.py)."""
        deadline, attempt = Deadline(self.deadline(timeout)), 0
        while True:
            try:
                response, call = method.with_call(
                    request, timeout=deadline.remaining(), metadata=self.metadata(metadata)
                )
                break
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            if not self._may_resend_call(method, failure, attempt, deadline):
                raise failure from None
            time.sleep(wait_before(attempt, self.backoff))
            attempt += 1
        self.last_replica = replica_of(call.initial_metadata()) or self.last_replica
        return response

    # -- stateless calls -----------------------------------------------------

    def classify(
        self, texts: list[str], model: str = "sentiment", timeout: float | None = None
    ) -> list[ClassifyResult]:
        request = pb.ClassifyRequest(model=model, texts=texts)
        return classify_results(self.call(self.classification.Classify, request, timeout=timeout))

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
        request = step_request(model, text, tokens, state, unknown_characters)
        return step_result(self.call(self.generation.Step, request))

    def models(self) -> list[pb.ModelInfo]:
        return list(self.call(self.models_stub.ListModels, pb.ListModelsRequest()).models)

    def describe(self, model: str) -> pb.ModelInfo:
        return self.call(self.models_stub.DescribeModel, pb.DescribeModelRequest(model=model))

    # -- sessions --------------------------------------------------------------

    def session(
        self, model: str = "charlm", prompt: str = "", unknown_characters: str = "reject", **defaults: Any
    ) -> Session:
        """A new session (closed when used as a context manager); ``defaults`` are sampling parameters."""
        request = create_request(model, prompt, unknown_characters, defaults)
        return Session(self, self.call(self.sessions.CreateSession, request, metadata=session_metadata()))

    def attach(self, session_id: str) -> Session:
        """An existing session, by id."""
        request = pb.GetSessionRequest(session_id=session_id)
        return Session(self, self.call(self.sessions.GetSession, request, metadata=session_metadata(session_id)))

    def import_session(self, state: pb.SessionState) -> Session:
        request = pb.ImportSessionRequest(state=state)
        return Session(self, self.call(self.sessions.ImportSession, request, metadata=session_metadata()))

    def list_sessions(self, model: str = "", page_size: int = 0) -> list[pb.Session]:
        """The caller's sessions (of ``model``, or all), oldest first: every page, ``page_size`` sessions per call
        (0: the server's default)."""
        found: list[pb.Session] = []
        pages = PageTokens()
        while True:
            request = pb.ListSessionsRequest(model=model, page_size=page_size, page_token=pages.token)
            response = self.call(self.sessions.ListSessions, request)
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
    ) -> Chat:
        """A Chat stream on a session it creates (``prompt`` and sampling ``defaults`` as for ``session``): the
        session ends with the stream unless ``keep_session``. ``timeout`` is the whole stream's deadline."""
        return Chat(self, chat_opening(model, prompt, unknown_characters, defaults, keep_session), timeout)


class Session:
    """A server-held session: its text so far lives in the server's (h, c)."""

    def __init__(self, client: Client, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.last_replica: str | None = client.last_replica
        self.tokens_seen = info.tokens_seen  # the session's count as last heard: from its info or a turn's chunk
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        response = self.client.call(method, request, metadata=session_metadata(self.id))
        self.last_replica = self.client.last_replica
        return response

    def generate(
        self, prompt: str = "", *, timeout: float | None = None, unknown_characters: str = "reject", **sampling: Any
    ) -> Iterator[Chunk]:
        """Append ``prompt``, then stream the generated characters (sampling: temperature, top_k, top_p,
        seed, max_tokens, stop). ``timeout`` (default: the client's) is the deadline of the whole turn, resends
        included. Leaving the loop early cancels the turn. A turn that failed before its first message is resent
        when ``resend.py`` says it is safe."""
        request = generate_request(self.id, prompt, unknown_characters, sampling)
        deadline, before, attempt = Deadline(self.client.deadline(timeout)), self.tokens_seen, 0
        while True:
            call = self.client.generation.Generate(
                request, timeout=deadline.remaining(), metadata=self.client.metadata(session_metadata(self.id))
            )
            received = False
            try:
                self.last_replica = replica_of(call.initial_metadata()) or self.last_replica
                for response in call:
                    received = True
                    chunk = chunk_of(response)
                    self.tokens_seen = chunk.tokens_seen
                    yield chunk
                return
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            finally:
                call.cancel()
            if not self._may_resend(failure, received, attempt, deadline, before):
                raise failure from None
            attempt += 1

    def _may_resend(self, failure: LstmError, received: bool, attempt: int, deadline: Deadline, before: int) -> bool:
        """After a wait, whether the failed turn goes again (resend.py), its session checked by GetSession."""
        if not worth_resending(failure, received, attempt, self.client.retries, deadline):
            return False
        time.sleep(wait_before(attempt, self.client.backoff))
        try:
            info = self.refresh()
        except LstmError:
            return False
        if not unchanged(info, before) or deadline.passed():
            return False
        log.info("resending the turn on session %s (%s)", self.id, failure)
        return True

    def chat(self, *, timeout: float | None = None) -> Chat:
        """A Chat stream on this session (which outlives the stream); ``timeout`` is the whole stream's deadline."""
        return Chat(self.client, pb.ChatRequest(session_id=self.id), timeout)

    def refresh(self) -> pb.Session:
        self.info = self._unary(self.client.sessions.GetSession, pb.GetSessionRequest(session_id=self.id))
        self.tokens_seen = self.info.tokens_seen
        return self.info

    def fork(self) -> Session:
        return Session(
            self.client, self._unary(self.client.sessions.ForkSession, pb.ForkSessionRequest(session_id=self.id))
        )

    def export(self) -> pb.SessionState:
        return self._unary(self.client.sessions.ExportSession, pb.ExportSessionRequest(session_id=self.id))

    def close(self) -> None:
        try:
            self._unary(self.client.sessions.CloseSession, pb.CloseSessionRequest(session_id=self.id))
        finally:
            self.closed = True


__all__ = ["Client", "LstmError", "Session", "TlsConfig"]
