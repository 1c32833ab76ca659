"""The Open Inference Protocol (KServe v2 gRPC: ``inference.GRPCInferenceService``, as Triton publishes it),
served beside lstm.v1 on the same port, on tritonclient's generated stubs.

- Readiness follows the server's health: NOT_SERVING (starting, draining) is not ready. The interceptor treats
  these RPCs as lstm.v1's: it authenticates each call (``caller()`` is its tenant) and answers a
  ``ServiceError`` as its status.
- A classifier answers a batch of texts in one response. A language model is a decoupled sequence model: a
  request is one turn of its sequence's session (``sequences.py``); in a stream each piece of text goes out as
  it is made, and the last response of a request says so (``triton_final_response``; with
  ``triton_enable_empty_final_response`` that last response is empty, after the text and the turn's end).
  ModelInfer answers the whole turn in one response.
- In a stream every request runs in its own task (at most ``config.inference_stream_requests`` at once; more wait to be
  read), so different sequences run concurrently; a request that fails, for whatever reason, answers
  ``error_message`` (its status code's name, then the message) and the stream goes on.
- Errors name their field in this protocol's terms (``inputs[0].datatype``, ``parameters.top_p``); the RPCs this
  server does not offer (repository load and unload, shared memory, trace and log settings) are UNIMPLEMENTED,
  saying what to do instead.
- ModelStatistics counts this protocol's requests per tenant and model: a caller sees its own
  (``inference_statistics.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from lstm.v1 import lstm_pb2 as pb
from tritonclient.grpc import service_pb2 as ip
from tritonclient.grpc import service_pb2_grpc as ip_grpc

from ..engine.models import ServedModel
from ..engine.turn import Chunk
from ..errors import ServiceError, Status
from ..metrics import build_versions
from ..sessions.turn import TurnStream
from .inference_statistics import Arrival, InferenceStatistics
from .interceptors import MAX_MESSAGE_CHARS, caller, count_request
from .open_inference_models import (
    EMPTY_FINAL,
    FINAL,
    SAMPLING_PARAMETERS,
    bool_parameter,
    check_parameter_names,
    count_output,
    infer_response,
    input_texts,
    model_config,
    model_metadata,
    probabilities_output,
    requested_outputs,
    sampling_params,
    served,
    text_output,
    v2_field,
)
from .requests import check_classify
from .sequences import SEQUENCE_PARAMETERS, Place, SequenceFlags, SequenceQueue, sequence_flags, sequence_session_id
from .servicers import Api

log = logging.getLogger(__name__)
SERVICE_NAME = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# ModelStatistics is served but "statistics" not listed: perf_analyzer 2.60 then asks for it and, without -x, fails
# ("failed to find the requested model version"); unlisted, it runs without server-side statistics
EXTENSIONS = ["model_configuration", "sequence", "parameters"]
GENERATION_PARAMETERS = (*SAMPLING_PARAMETERS, *SEQUENCE_PARAMETERS, EMPTY_FINAL)
Context = grpc.aio.ServicerContext
UNSUPPORTED = {  # the protocol's RPCs this server does not offer: why, and what to do instead
    **dict.fromkeys(
        ["RepositoryModelLoad", "RepositoryModelUnload"],
        "it serves the models of its repository (--models, --model-versions) from its start and loads or unloads "
        "none at run time: restart it to change them (RepositoryIndex lists those served)",
    ),
    **dict.fromkeys(
        [f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda") for verb in ("Status", "Register", "Unregister")],
        "it has no shared memory: send tensors in the request (raw_input_contents or contents)",
    ),
    "TraceSetting": "its traces are OpenTelemetry spans, set at start (--tracing, --otlp-endpoint)",
    "LogSettings": "its logs are JSON lines on stderr, their level set at start (--log-level)",
}


@dataclass
class Job:
    """One inference request, checked; a sequence's request holds its place in the sequence's queue."""

    request: ip.ModelInferRequest
    model: ServedModel
    texts: list[str]
    outputs: list[str]  # the outputs to send, in order
    sampling: pb.SamplingParams | None = None
    flags: SequenceFlags | None = None
    session_id: str = ""  # the sequence's session; "" for a request that is a sequence of its own
    place: Place | None = None
    empty_final: bool = False  # a stream ends the request with an empty response (triton_enable_empty_final_response)
    arrival: Arrival = field(default_factory=Arrival)
    queue_ns: int | None = None  # a generation request's wait for its sequence's earlier requests (0: none)
    compute_ns: int | None = None  # the classification, or the turn to its last chunk


def stream_error(request: ip.ModelInferRequest, error: Exception, started: float) -> ip.ModelStreamInferResponse:
    """A stream's answer to a request (that arrived at ``started``) that failed: the code's name and the message
    (INTERNAL, logged, for anything but a ``ServiceError``); nothing more follows for it. The request is counted."""
    if not isinstance(error, ServiceError):
        log.error("unexpected error in ModelStreamInfer", exc_info=error)
        error = ServiceError(Status.INTERNAL, f"internal error in ModelStreamInfer: {error}")
    count_request(request.model_name, started, error.code.name, error.reason)
    response = ip.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    response.parameters[FINAL].bool_param = True
    return ip.ModelStreamInferResponse(
        error_message=f"{error.code.name}: {error.message}"[:MAX_MESSAGE_CHARS], infer_response=response
    )


def _unsupported(name: str, instead: str) -> Callable:
    async def refuse(self, request, context: Context) -> NoReturn:
        raise ServiceError(Status.UNIMPLEMENTED, f"{name} is not supported by this server: {instead}")

    refuse.__name__ = name
    return refuse


class Outbox:
    """A stream's responses on their way to the client: at most ``size`` wait; ``close`` ends the stream."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[ip.ModelStreamInferResponse | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(size)

    async def put(self, response: ip.ModelStreamInferResponse) -> None:
        await self._room.acquire()
        self._queue.put_nowait(response)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def responses(self) -> AsyncIterator[ip.ModelStreamInferResponse]:
        while (response := await self._queue.get()) is not None:
            self._room.release()
            yield response


class InferenceService(ip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: Api, ready: Callable[[], bool]) -> None:
        self.api = api
        self.ready = ready  # the server's health is SERVING
        self.queue = SequenceQueue()
        self.statistics = InferenceStatistics()
        signer = api.states.signer
        self.sequence_key = signer.keys[signer.signing_id]  # replicas share it: they derive the same sessions

    # -- health and metadata ------------------------------------------------------------------------------------

    async def ServerLive(self, request: ip.ServerLiveRequest, context: Context) -> ip.ServerLiveResponse:
        return ip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: ip.ServerReadyRequest, context: Context) -> ip.ServerReadyResponse:
        return ip.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: ip.ModelReadyRequest, context: Context) -> ip.ModelReadyResponse:
        """Ready if the server is and serves this model and version (false, not an error, for one it does not)."""
        model = self.api.models.models.get(request.name)
        ready = model is not None and request.version in ("", str(model.version)) and self.ready()
        return ip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: ip.ServerMetadataRequest, context: Context) -> ip.ServerMetadataResponse:
        return ip.ServerMetadataResponse(name="lstm-server", version=build_versions()["version"], extensions=EXTENSIONS)

    async def ModelMetadata(self, request: ip.ModelMetadataRequest, context: Context) -> ip.ModelMetadataResponse:
        return model_metadata(served(self.api.models, request.name, request.version))

    async def ModelConfig(self, request: ip.ModelConfigRequest, context: Context) -> ip.ModelConfigResponse:
        model = served(self.api.models, request.name, request.version)
        return ip.ModelConfigResponse(config=model_config(model, self.api.config))

    async def RepositoryIndex(self, request: ip.RepositoryIndexRequest, context: Context) -> ip.RepositoryIndexResponse:
        """The served models (each its one served version), all READY: this server loads nothing at run time."""
        index = ip.RepositoryIndexResponse.ModelIndex
        return ip.RepositoryIndexResponse(
            models=[index(name=m.name, version=str(m.version), state="READY") for m in self.api.models.all()]
        )

    async def ModelStatistics(self, request: ip.ModelStatisticsRequest, context: Context) -> ip.ModelStatisticsResponse:
        return self.model_statistics(request, caller())

    def model_statistics(self, request: ip.ModelStatisticsRequest, tenant: str) -> ip.ModelStatisticsResponse:
        """The named model's statistics (NOT_FOUND like ModelMetadata), or with name "" every served model's
        whose served version is ``version`` ("": every one), as ``tenant`` sees them."""
        if request.name:
            models = [served(self.api.models, request.name, request.version)]
        else:
            models = [m for m in self.api.models.all() if request.version in ("", str(m.version))]
        return ip.ModelStatisticsResponse(model_stats=[self.statistics.message(tenant, model) for model in models])

    def _succeeded(self, job: Job, tenant: str) -> None:
        self.statistics.succeeded(tenant, job.model, job.arrival, len(job.texts), job.queue_ns, job.compute_ns)

    def _failed(self, request: ip.ModelInferRequest, tenant: str, arrival: Arrival) -> None:
        """Count a failed request against its model, if it names one that is served."""
        with contextlib.suppress(ServiceError):
            model = served(self.api.models, request.model_name, request.model_version, "model_name")
            self.statistics.failed(tenant, model, arrival)

    # -- inference ----------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: ip.ModelInferRequest, context: Context) -> ip.ModelInferResponse:
        return await self.infer(request, caller())

    async def infer(self, request: ip.ModelInferRequest, tenant: str) -> ip.ModelInferResponse:
        """One request of ``tenant``, answered whole (ModelInfer, and the HTTP binding's infer and generate)."""
        (response,) = [response async for response in self.infer_pieces(request, tenant, streaming=False)]
        return response

    async def infer_pieces(
        self, request: ip.ModelInferRequest, tenant: str, streaming: bool = True
    ) -> AsyncIterator[ip.ModelInferResponse]:
        """One request of ``tenant``, counted in the statistics; ``streaming``: a language model's text in pieces as
        it is made (the HTTP generate_stream), else one response. Errors name fields in this protocol's terms."""
        arrival = Arrival()
        try:
            job = self._prepare(request, tenant, arrival)
            try:
                async with contextlib.aclosing(self._run(job, tenant, streaming)) as responses:
                    async for response in responses:
                        yield response
            finally:
                if job.place is not None:
                    job.place.leave()
        except Exception as error:
            self._failed(request, tenant, arrival)
            if isinstance(error, ServiceError):
                error.field = v2_field(error.field)
            raise
        self._succeeded(job, tenant)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[ip.ModelInferRequest], context: Context
    ) -> AsyncIterator[ip.ModelStreamInferResponse]:
        tenant = caller()
        outbox = Outbox(self.api.config.inference_stream_buffer)
        reader = asyncio.get_running_loop().create_task(self._dispatch(request_iterator, tenant, outbox))
        try:
            async for response in outbox.responses():
                yield response
            await reader  # the request stream's own failure, if any, ends the call
        finally:
            reader.cancel()

    async def _dispatch(self, requests: AsyncIterator[ip.ModelInferRequest], tenant: str, outbox: Outbox) -> None:
        """Read the stream's requests in order; check each and give it its place in its sequence at once, then
        run it in its own task. Closes the outbox once every request is answered."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.api.config.inference_stream_requests)
        running: set[asyncio.Task] = set()

        def finished(job: Job, task: asyncio.Task) -> None:
            running.discard(task)
            slots.release()
            if job.place is not None:
                job.place.leave()  # also for a task cancelled before it began

        try:
            async for request in requests:
                arrival, started = Arrival(), time.perf_counter()
                await slots.acquire()
                try:
                    job = self._prepare(request, tenant, arrival)
                except Exception as error:  # this request fails; the stream goes on
                    slots.release()
                    self._failed(request, tenant, arrival)
                    await outbox.put(stream_error(request, error, started))
                    continue
                task = loop.create_task(self._stream_one(job, tenant, outbox, started))
                running.add(task)
                task.add_done_callback(functools.partial(finished, job))
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            outbox.close()

    async def _stream_one(self, job: Job, tenant: str, outbox: Outbox, started: float) -> None:
        """Run one request of a stream (that arrived at ``started``), its responses into the outbox; counted
        alone, as if a call of its own."""
        request = job.request
        try:  # closed here, cancelled or not: the turn ends before the request's place in its sequence is left
            async with contextlib.aclosing(self._run(job, tenant, streaming=True)) as responses:
                async for response in responses:
                    await outbox.put(ip.ModelStreamInferResponse(infer_response=response))
            self._succeeded(job, tenant)
            count_request(job.model.name, started)
        except asyncio.CancelledError:  # the stream ended first
            count_request(job.model.name, started, "CANCELLED")
            raise
        except Exception as error:  # this request fails; the stream goes on
            self.statistics.failed(tenant, job.model, job.arrival)
            await outbox.put(stream_error(request, error, started))

    def _prepare(self, request: ip.ModelInferRequest, tenant: str, arrival: Arrival | None = None) -> Job:
        """Check the request against its model; a sequence's request joins its sequence's queue (call in arrival
        order)."""
        arrival = arrival or Arrival()
        model = served(self.api.models, request.model_name, request.model_version, "model_name")
        if model.task == "classification":
            check_parameter_names(request.parameters, model, (EMPTY_FINAL,))
            texts = input_texts(request, model)
            check_classify(texts, self.api.config)
            return Job(request, model, texts, requested_outputs(request, model), arrival=arrival)
        check_parameter_names(request.parameters, model, GENERATION_PARAMETERS)
        texts = input_texts(request, model)
        outputs = requested_outputs(request, model)
        sampling = sampling_params(request.parameters, self.api.config.max_stop_strings)
        flags = sequence_flags(request.parameters)
        empty_final = bool_parameter(request.parameters, EMPTY_FINAL)
        session_id = "" if flags.id is None else sequence_session_id(self.sequence_key, tenant, model.name, flags.id)
        place = self.queue.join(session_id) if session_id else None
        return Job(request, model, texts, outputs, sampling, flags, session_id, place, empty_final, arrival)

    async def _run(self, job: Job, tenant: str, streaming: bool) -> AsyncIterator[ip.ModelInferResponse]:
        """The request's responses: one, or in a stream a language model's pieces of text as they come."""
        model, final = job.model, (True if streaming else None)
        if model.task == "classification":
            started = time.monotonic_ns()
            labels, rows = await self.api.classify(model, job.texts)
            job.compute_ns = time.monotonic_ns() - started
            values = {"LABEL": text_output(labels), "PROBS": probabilities_output(rows)}
            yield infer_response(job.request, model, values, job.outputs, final)
            return
        parts: list[str] = []  # a unary call's text so far
        async with contextlib.aclosing(self._turn(job, tenant)) as chunks:
            async for chunk in chunks:
                if not streaming:
                    parts.append(chunk.text)
                if chunk.end is None:
                    if streaming:
                        text = {"TEXT_OUT": text_output([chunk.text])}
                        yield infer_response(job.request, model, text, job.outputs, False)
                    continue
                values = {
                    "TEXT_OUT": text_output([chunk.text if streaming else "".join(parts)]),
                    "TOKENS_SEEN": count_output(chunk.tokens_seen),
                    "FINISH_REASON": text_output([chunk.end.finish_reason or ""]),
                }
                if streaming and job.empty_final:  # the end goes with the last text, then a response with nothing
                    yield infer_response(job.request, model, values, job.outputs, False)
                    yield infer_response(job.request, model, {}, job.outputs, True)
                else:
                    yield infer_response(job.request, model, values, job.outputs, final)

    # -- sequences ----------------------------------------------------------------------------------------------

    async def _turn(self, job: Job, tenant: str) -> AsyncIterator[Chunk]:
        """Run the request as a turn of its sequence's session, after every earlier request of the sequence. A
        sequence's end (or a request without a sequence) closes the session before the last chunk goes out; a
        start that cannot run its turn leaves no sequence behind; a request cancelled before its turn changes
        nothing."""
        flags = job.flags
        closing, session_id, turn = False, "", None
        try:
            waited = time.monotonic_ns()
            if job.place is not None:
                await job.place.wait()
            started = time.monotonic_ns()
            job.queue_ns = started - waited if job.place is not None else 0
            closing = flags.end or not job.session_id
            session_id = await self._open(job, tenant)
            try:
                turn = await self._start(job, tenant, session_id)
            except BaseException:
                closing = closing or flags.start
                raise
            close, closing = ((session_id, tenant) if closing else None), False  # the stream closes it now
            async with contextlib.aclosing(self.api.stream(turn, close)) as chunks:
                async for chunk in chunks:
                    if chunk.end is not None:
                        job.compute_ns = time.monotonic_ns() - started
                    yield chunk
        finally:
            settled = turn.close() if turn is not None else None
            if closing and session_id:
                await self.api.close_quietly(session_id, tenant)
            if job.place is not None:
                job.place.leave(after=settled)  # once the session is free

    async def _open(self, job: Job, tenant: str) -> str:
        """The session the request runs on: a new one for a request without a sequence, a fresh one (the old
        closed) on a sequence's start, else the sequence's."""
        create = pb.CreateSessionRequest(model=job.model.name)
        if not job.session_id:
            return (await self.api.create(create, tenant, "")).id
        if job.flags.start:
            try:
                await self.api.sessions.close(job.session_id, tenant)
            except ServiceError as error:
                if error.code != Status.NOT_FOUND:
                    raise
            await self.api.create(create, tenant, job.session_id)
        return job.session_id

    async def _start(self, job: Job, tenant: str, session_id: str) -> TurnStream:
        try:
            return await self.api.start_turn(
                session_id, tenant, job.texts[0], job.sampling, pb.UNKNOWN_CHARACTERS_REJECT
            )
        except ServiceError as error:
            if error.code != Status.NOT_FOUND or job.flags.start or not job.session_id:
                raise
            raise ServiceError(
                Status.NOT_FOUND,
                f"{job.flags.shown()} of model {job.model.name!r} is not open: it was never started, it ended, or it "
                f"was idle longer than {self.api.config.idle_timeout_s:g} s; send its first request with "
                "sequence_start",
            ) from None


for _name, _instead in UNSUPPORTED.items():  # instead of the generated base's INTERNAL "Method not implemented!"
    setattr(InferenceService, _name, _unsupported(_name, _instead))
