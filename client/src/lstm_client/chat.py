"""The Chat stream as a conversation: ``Chat`` (sync) and what it shares with the asyncio ``AsyncChat``.

A Chat stream carries many turns on one session. Its first message creates the session (which the server closes
when the stream ends, unless ``keep_session``) or names an existing one (which outlives the stream). A running
turn can only be stopped by ending the stream: leaving an answer's loop early does that, and the next ``send``
opens a new stream naming the same session, so the conversation goes on; a session that ended with its stream
cannot, and ``send`` raises ``FailedPrecondition``."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from lstm.v1 import lstm_pb2 as pb

from .errors import FailedPrecondition, LstmError, from_rpc_error
from .results import Chunk, chunk_of, create_request, sampling_params, session_metadata
from .transport import Metadata

if TYPE_CHECKING:
    from .client import Connection


def chat_opening(
    model: str, prompt: str, unknown_characters: str, defaults: dict[str, Any], keep_session: bool
) -> pb.ChatRequest:
    """The first message of a Chat that creates its session."""
    create = create_request(model, prompt, unknown_characters, defaults)
    return pb.ChatRequest(create=create, keep_session=keep_session)


class ChatState:
    """What a sync or asyncio Chat keeps between streams: the session, whether it ends with the stream, the
    messages that open a stream or carry a turn, and what the answers say."""

    def __init__(self, opening: pb.ChatRequest) -> None:
        self.opening = opening
        self.session_id = opening.session_id
        self.owned = opening.WhichOneof("session") == "create" and not opening.keep_session
        self.tokens_seen = 0

    def metadata(self) -> Metadata:
        """``x-session-id`` for a stream (a fresh proposed id before the session exists)."""
        return session_metadata(self.session_id)

    def turn(self, text: str, sampling: dict[str, Any], *, new_stream: bool) -> pb.ChatRequest:
        """The message of one turn; on a new stream it also names the session (refused when the session ended
        with the stream that created it)."""
        request = pb.ChatRequest(text=text, sampling=sampling_params(**sampling))
        if new_stream:
            if self.owned:
                raise FailedPrecondition(
                    f"session {self.session_id} ended with the Chat stream that created it (keep_session=False)"
                )
            request.session_id = self.session_id
        return request

    def read(self, response: pb.ChatResponse) -> Chunk:
        self.session_id = response.session_id or self.session_id
        self.tokens_seen = response.tokens_seen
        return chunk_of(response)


class Chat:
    """A conversation on a Chat stream (``Client.chat`` or ``Session.chat``): ``for chunk in chat.send(text)``
    runs one turn and streams its answer (the last chunk has ``finish_reason``); the session carries over from
    turn to turn. Sampling given to ``send`` applies to that turn. ``close()`` (or the end of a ``with`` block)
    ends the stream after the last answer; ``cancel()`` ends it at once. ``session_id`` and ``tokens_seen`` say
    where the session is."""

    def __init__(self, client: Connection, opening: pb.ChatRequest, timeout: float | None) -> None:
        self.client = client
        self._state = ChatState(opening)
        self._timeout = client.deadline(timeout)
        self._requests: queue.SimpleQueue[pb.ChatRequest | None] | None = None
        self._call: Any = None
        self._start(opening)
        for _ in self._answer():  # the server's reply to the opening: the session's id and count
            pass

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def tokens_seen(self) -> int:
        return self._state.tokens_seen

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    def _start(self, first: pb.ChatRequest) -> None:
        requests: queue.SimpleQueue[pb.ChatRequest | None] = queue.SimpleQueue()
        requests.put(first)
        metadata = self.client.metadata(self._state.metadata())
        self._call = self.client.generation.Chat(iter(requests.get, None), timeout=self._timeout, metadata=metadata)
        self._requests = requests

    def send(self, text: str, **sampling: Any) -> Iterator[Chunk]:
        """Send ``text`` as one turn when iteration starts, and stream its answer. Leaving the loop early ends the
        stream (and so the turn)."""
        request = self._state.turn(text, sampling, new_stream=self._call is None)
        if self._call is None:
            self._start(request)
        else:
            self._requests.put(request)
        yield from self._answer()

    def _answer(self) -> Iterator[Chunk]:
        call, finished = self._call, False
        try:
            for response in call:
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
            self._requests.put(None)  # ends the request iterator, and grpc's thread that reads it
            self._call = self._requests = None

    def close(self) -> None:
        """End the stream after the last answer (the server then closes a session the stream owns)."""
        if self._call is None:
            return
        call, self._call = self._call, None
        self._requests.put(None)
        self._requests = None
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
