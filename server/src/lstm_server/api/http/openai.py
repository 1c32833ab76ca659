"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions`` (plain and streamed), and a clear 404 for
``/v1/chat/completions`` (a character model has no chat format).

A completion is stateless by default: the prompt is the whole text. It opens a session that reads the prompt once,
forks it for each further choice (``n``: every choice starts from that one read), runs a turn on each and closes
them all; an ``x-session-id`` header instead continues that server-held session (``n`` 1). Lengths and ``usage`` are
in characters, the model's tokens. With a ``seed``, choice ``i`` draws with seed ``seed + i`` (so choice 0 is what
lstm.v1 gives for that seed); without one, each choice draws from a random seed. ``logprobs`` are the model's own
(temperature 1) log probabilities of each character and of its most likely alternatives, read from the same states
the turn drew from. What OpenAI offers and this server cannot do is refused, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from lstm.v1 import lstm_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, StreamingResponse

from ...engine.models import ServedModel
from ...engine.sampling import softmax
from ...engine.turn import Chunk
from ...errors import ServiceError, Status, invalid
from ..requests import check_proposed_id
from .calls import json_body, read_body, set_model
from .errors import openai_error
from .front import Front
from .v2_json import parse_json

MAX_LOGPROBS = 5  # OpenAI's bound on the alternatives per character
MAX_CHOICES = 16  # completions in one request (prompts x n)
SEED_RANGE = 2**63  # a random seed below this: the seed plus a choice index stays within uint64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``' body (OpenAI's fields; ``top_k`` and ``unknown_characters`` are this server's)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_RANGE)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    unknown_characters: Literal["reject", "skip", "replace"] = "reject"

    def refuse_unsupported(self) -> None:
        """INVALID_ARGUMENT for a field this server accepts from OpenAI's API but cannot honour."""
        reasons = {
            "best_of": (self.best_of not in (None, self.n), "every choice is returned: leave best_of out (or = n)"),
            "echo": (self.echo and self.logprobs is not None, "echo with logprobs is not supported: ask for one"),
            "presence_penalty": (self.presence_penalty != 0, "penalties are not supported: leave it 0"),
            "frequency_penalty": (self.frequency_penalty != 0, "penalties are not supported: leave it 0"),
            "logit_bias": (bool(self.logit_bias), "logit_bias is not supported"),
            "suffix": (self.suffix is not None, "suffix (insertion) is not supported by a left-to-right model"),
            "stream_options": (self.stream_options is not None and not self.stream, "stream_options needs stream"),
        }
        for name, (refused, why) in reasons.items():
            if refused:
                raise invalid(why, reason="UNSUPPORTED_PARAMETER", field=name)
        prompts = self.prompts()
        if len(prompts) * self.n > MAX_CHOICES:
            raise invalid(
                f"{len(prompts)} prompts x n={self.n} is more than {MAX_CHOICES} completions: send fewer",
                reason="TOO_MANY_CHOICES",
                field="n",
            )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling(self, choice: int, base_seed: int) -> pb.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        values = {k: v for k, v in values.items() if v is not None}
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        return pb.SamplingParams(seed=base_seed + choice, max_tokens=max_tokens, stop=stop, **values)


def validation_error(error: ValidationError) -> ServiceError:
    """A body that does not fit ``CompletionRequest``: its first problem, with the field's path."""
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = f"{field}: {first['msg']}" if field else first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"{field} is not a completions parameter this server knows (docs/http.md lists them)"
    return invalid(message[:500], reason="INVALID_PARAMETER", field=field)


class Logprobs:
    """The model's log probabilities along a choice's text, read from the state the turn drew its first character
    from (``h``, ``c`` and its next logits), one state a character."""

    def __init__(self, model: ServedModel, tenant: str, h: np.ndarray, c: np.ndarray, logits: np.ndarray, top: int):
        self.engine, self.tenant, self.top = model.engine, tenant, top
        self.h, self.c = h, c
        self.logp = _log(softmax(logits.reshape(-1)))  # as Step computes its probabilities

    async def read(self, text: str, offset: int) -> dict[str, list]:
        """OpenAI's logprobs object for ``text``, which starts at ``offset`` in the choice's text."""
        vocab = self.engine.codec.vocab
        result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, char in enumerate(text):
            token = self.engine.codec.index[char]
            result["tokens"].append(char)
            result["token_logprobs"].append(float(self.logp[token]))
            best = np.argsort(-self.logp, kind="stable")[: self.top]
            result["top_logprobs"].append({vocab[j]: float(self.logp[j]) for j in best.tolist()})
            result["text_offset"].append(offset + i)
            probabilities, self.h, self.c = await self.engine.step(np.array([token], np.int64), self.h, self.c)
            self.logp = _log(probabilities)
        return result


def _log(probabilities: np.ndarray) -> np.ndarray:
    """Natural logs, in float64, of a distribution (a character of probability 0 gets the least float64)."""
    return np.log(np.maximum(probabilities.astype(np.float64).reshape(-1), np.finfo(np.float64).tiny))


class Completion:
    """One completions request, run: its choices' sessions, their turns, and what each sent (event loop only)."""

    def __init__(self, front: Front, body: CompletionRequest, tenant: str, session_id: str | None) -> None:
        self.front, self.body, self.tenant, self.session_id = front, body, tenant, session_id
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = front.api.models.of_task(body.model, "generation")
        self.base_seed = body.seed if body.seed is not None else secrets.randbelow(SEED_RANGE)
        self.owned: list[str] = []  # sessions this request opened, closed at its end
        self.prompt_chars = 0
        self.generated = 0

    async def choices(self) -> AsyncIterator[tuple[int, Chunk, dict | None]]:
        """Every choice's chunks as they come: (choice index, chunk, its logprobs)."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        try:
            starts = await self._start()  # sessions it opened are closed below, even if a later one fails
            tasks = [asyncio.create_task(self._run(i, *start, queue)) for i, start in enumerate(starts)]
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for session_id in self.owned:
                await self.front.api.close_quietly(session_id, self.tenant)

    async def _start(self) -> list[tuple[str, Logprobs | None, int]]:
        """Open (or find) the sessions: per choice its session id, logprobs reader and the prompt it echoes."""
        api, body = self.front.api, self.body
        if self.session_id is not None:
            if body.n != 1 or len(body.prompts()) != 1:
                raise invalid("a completion on a session (x-session-id) has one prompt and n 1", field="n")
            session = await api.sessions.resolve(self.session_id, self.tenant)
            if session.model != self.model.name:
                raise ServiceError(
                    Status.FAILED_PRECONDITION,
                    f"session {self.session_id} is of model {session.model!r}, not {self.model.name!r}",
                    reason="MODEL_MISMATCH",
                    field="model",
                )
            # the turn reads the prompt; logprobs would need the state after it, before the turn: refused
            if body.logprobs is not None:
                raise invalid("logprobs are for stateless completions (no x-session-id)", field="logprobs")
            self.prompt_chars += len(body.prompts()[0])
            return [(self.session_id, None, 0)]
        starts = []
        policy = pb.UnknownCharacters.Value(f"UNKNOWN_CHARACTERS_{body.unknown_characters.upper()}")
        for prompt in body.prompts():
            create = pb.CreateSessionRequest(model=self.model.name, prompt=prompt, unknown_characters=policy)
            session = await api.create(create, self.tenant, "")
            self.owned.append(session.id)
            self.prompt_chars += len(prompt)
            reader = None
            if body.logprobs is not None:
                state = api.sessions.snapshot(session)
                logits = state.next_logits
                if logits is None:
                    raise invalid("logprobs need a prompt of at least one character", field="prompt")
                reader = Logprobs(self.model, self.tenant, state.h, state.c, logits, body.logprobs)
            ids = [session.id]
            for _ in range(body.n - 1):
                fork = await api.sessions.fork(session.id, self.tenant)
                self.owned.append(fork.id)
                ids.append(fork.id)
            starts += [(sid, _copy(reader), len(prompt) if body.echo else 0) for sid in ids]
        return starts

    async def _run(self, index: int, session_id: str, logprobs: Logprobs | None, offset: int, queue) -> None:
        try:
            api = self.front.api
            prompt = self.body.prompts()[0] if self.session_id is not None else ""
            turn = await api.start_turn(
                session_id, self.tenant, prompt, self.body.sampling(index, self.base_seed), pb.UNKNOWN_CHARACTERS_REJECT
            )
            async with contextlib.aclosing(api.stream(turn)) as chunks:
                async for chunk in chunks:
                    self.generated += len(chunk.text)
                    probs = await logprobs.read(chunk.text, offset) if logprobs is not None else None
                    offset += len(chunk.text)
                    await queue.put((index, chunk, probs))
        except BaseException as error:  # handed to the reader, which raises it
            await queue.put(error if not isinstance(error, asyncio.CancelledError) else None)
            if isinstance(error, asyncio.CancelledError):
                raise
        else:
            await queue.put(None)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_chars,
            "completion_tokens": self.generated,
            "total_tokens": self.prompt_chars + self.generated,
        }

    def envelope(self, choices: list[dict], usage: bool = False) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model.name,
            "system_fingerprint": f"{self.model.name}/{self.model.version}",
            "choices": choices,
        }
        if usage:
            body["usage"] = self.usage()
        return body


def _copy(reader: Logprobs | None) -> Logprobs | None:
    if reader is None:
        return None
    copy = Logprobs.__new__(Logprobs)
    copy.__dict__.update(reader.__dict__)
    return copy


def _merge(into: dict | None, more: dict | None) -> dict | None:
    if more is None:
        return into
    if into is None:
        return {key: list(values) for key, values in more.items()}
    for key, values in more.items():
        into[key] += values
    return into


def _sse(body: dict | str) -> bytes:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["OpenAI-compatible"])

    @routes.get("/v1/models", name="openai.models", summary="The served models, as OpenAI lists them")
    async def models(request: Request) -> dict:
        front.tenant(request)
        return {"object": "list", "data": [_model_card(m) for m in front.api.models.all()]}

    @routes.get("/v1/models/{model}", name="openai.model", summary="One served model")
    async def model(request: Request, model: str) -> dict:
        front.tenant(request)
        set_model(request, model)
        return _model_card(front.api.models.get(model, "model"))

    @routes.post(
        "/v1/completions",
        name="openai.completions",
        summary="Text completions (stream: server-sent events ending with [DONE])",
        openapi_extra=json_body(CompletionRequest.model_json_schema()),
    )
    async def completions(request: Request) -> Response:
        tenant = front.tenant(request)
        raw = await read_body(request, front.config.max_message_bytes, front.config.http_body_timeout_s)
        document = parse_json(raw)
        try:
            body = CompletionRequest.model_validate(document)
        except ValidationError as error:
            raise validation_error(error) from None
        set_model(request, body.model)
        body.refuse_unsupported()
        session_id = request.headers.get("x-session-id")
        run = Completion(front, body, tenant, None if session_id is None else check_proposed_id(session_id))
        if body.stream:
            chunks = run.choices()
            first = await anext(chunks)  # errors before any text are the request's status
            return StreamingResponse(_stream(run, first, chunks, request), media_type="text/event-stream")
        return JSONResponse(await _whole(run))

    @routes.post("/v1/chat/completions", name="openai.chat", summary="Not offered: a character model has no chat")
    async def chat(request: Request) -> Response:
        front.tenant(request)
        raise ServiceError(
            Status.NOT_FOUND,
            "chat completions are not offered: the served language model reads plain text and has no chat format; "
            "send the conversation as text to /v1/completions (or use lstm.v1's Chat)",
            reason="NO_CHAT_FORMAT",
        )

    return routes


def _model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "lstm-serving", "task": model.task}


async def _whole(run: Completion) -> dict[str, Any]:
    count = len(run.body.prompts()) * run.body.n
    texts: list[list[str]] = [[] for _ in range(count)]
    probs: list[dict | None] = [None] * count
    ends: list[str] = [""] * count
    async with contextlib.aclosing(run.choices()) as chunks:
        async for index, chunk, logprobs in chunks:
            texts[index].append(chunk.text)
            probs[index] = _merge(probs[index], logprobs)
            if chunk.end is not None:
                ends[index] = chunk.end.finish_reason or "stop"
    prompts = run.body.prompts()
    choices = [
        {
            "index": i,
            "text": (prompts[i // run.body.n] if run.body.echo else "") + "".join(texts[i]),
            "logprobs": probs[i] if run.body.logprobs is not None else None,
            "finish_reason": ends[i],
        }
        for i in range(count)
    ]
    return run.envelope(choices, usage=True)


async def _stream(run: Completion, first: tuple, chunks: AsyncIterator, request: Request) -> AsyncIterator[bytes]:
    """The choices' chunks as server-sent events, ``data: [DONE]`` last; an error after the first chunk is an
    OpenAI error object as the last event."""
    echoed: set[int] = set()
    prompts = run.body.prompts()

    def event(index: int, chunk: Chunk, logprobs: dict | None) -> bytes:
        text = chunk.text
        if run.body.echo and index not in echoed:
            echoed.add(index)
            text = prompts[index // run.body.n] + text
        end = None if chunk.end is None else chunk.end.finish_reason or "stop"
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": end}
        return _sse(run.envelope([choice]))

    async with contextlib.aclosing(chunks):
        yield event(*first)
        try:
            async for item in chunks:
                yield event(*item)
        except ServiceError as error:
            yield _sse(json.loads(openai_error(error, request.state.request_id).body))
            return
    if run.body.stream_options is not None and run.body.stream_options.include_usage:
        yield _sse(run.envelope([], usage=True))
    yield _sse("[DONE]")
