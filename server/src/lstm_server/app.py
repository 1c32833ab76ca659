"""Assemble and run the server: models and their engines, sessions and their store, services, authentication and
TLS, health, reflection, metrics, idle expiry, graceful stop.

The layers, each built from the ones below it (imports only go down):

    runtime   ModelRegistry: each model's repository entry, opened on its backend
    engine    an engine per model (built here), in ServedModels
    sessions  SessionManager over the SessionTable and the store (memory or Redis)
    api       the services and the interceptor; StateMessages signs states (and encodes them for the store)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc
from tritonclient.grpc import service_pb2_grpc as inference_rpc

from .api.auth import AuthConfigError, Authenticator, ServerTls
from .api.http.app import build_app
from .api.http.front import Front
from .api.http.server import HttpServer
from .api.http.server import bind as bind_http
from .api.interceptors import ServiceInterceptor
from .api.open_inference import SERVICE_NAME as INFERENCE_SERVICE
from .api.open_inference import InferenceService
from .api.servicers import Api, ClassificationService, GenerationService, ModelsService, SessionsService
from .api.state import StateMessages
from .api.state_signing import StateKeyError, StateSigner
from .config import ServerConfig
from .engine.classification import ClassifierEngine
from .engine.codec import CharCodec
from .engine.generation import EngineConfig, GenerationEngine
from .engine.models import ServedModel, ServedModels
from .engine.slots import StateSlots
from .errors import ServiceError
from .metrics import Metrics
from .runtime.decoding import load_decoder
from .runtime.registry import LoadedModel, ModelRegistry
from .sessions.manager import SessionManager
from .sessions.redis_store import RedisPrefixStore, RedisSessionStore
from .sessions.store import MemoryStore, SessionStore
from .sessions.table import SessionTable

log = logging.getLogger(__name__)
LSTM_SERVICES = ("Sessions", "Generation", "Classification", "Models")
SERVICE_NAMES = [*(pb.DESCRIPTOR.services_by_name[name].full_name for name in LSTM_SERVICES), INFERENCE_SERVICE]


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says why in one line."""


def port_taken(address: str, option: str = "--port") -> StartupError:
    return StartupError(
        f"cannot listen on {address}: the port is in use (or the address is not this machine's); stop the other "
        f"server or choose another {option}"
    )


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """StartupError if ``host:port`` cannot be bound now: checked before anything else starts, so that a start
    that fails for it says so in one line (nothing loaded, nothing logged, no gRPC message of its own)."""
    if not port:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise port_taken(f"{host}:{port}", option) from error
    with socket.socket(family, kind, proto) as probe:  # something listens there: another server
        probe.settimeout(0.5)
        listening = probe.connect_ex(sockaddr) == 0
    if listening:
        raise port_taken(f"{host}:{port}", option)
    try:  # or the address cannot be bound at all (not this machine's, a privileged port)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for gRPC too
            probe.bind(sockaddr)
    except OSError as error:
        raise port_taken(f"{host}:{port}", option) from error


def engine_for(model: LoadedModel, config: ServerConfig, metrics: Metrics) -> GenerationEngine | ClassifierEngine:
    """The engine that serves a loaded model: the scheduler over state slots for a language model, the batcher
    for a classifier."""
    entry = model.entry
    layers = entry.num_layers * entry.num_directions
    if entry.task == "generation":
        codec = CharCodec(entry.vocab)
        slots = StateSlots(layers, entry.hidden_size, len(codec), config.max_sessions)
        threads = config.threads_for(entry.name)
        decoder = load_decoder(
            entry,
            model.backend,
            config.max_batch,
            config.max_decode_steps,
            threads,
            config.thread_spinning,
            config.single_thread_rows,
        )
        # niced only where onnxruntime runs the decode call on this thread alone: with more threads its own workers
        # run at the usual priority, and every parallel section would wait for the niced one
        engine_config = dataclasses.replace(
            EngineConfig.of(config),
            decode_nice=config.decode_nice if threads == 1 else 0,
            prefix_cache_shared=config.prefix_cache_shared_by(entry.name),
        )
        return GenerationEngine(entry.name, model.backend, codec, slots, decoder, metrics, engine_config)
    from tokenizers import Tokenizer

    return ClassifierEngine(
        entry.name,
        model.backend,
        Tokenizer.from_str(entry.tokenizer_json()),
        entry.labels,
        (layers, entry.hidden_size),
        entry.manifest.get("pad_id", 0),
        config.classify_max_batch,
        config.classify_max_delay_ms,
        metrics,
    )


def open_store(config: ServerConfig, table: SessionTable, metrics: Metrics) -> SessionStore:
    """The configured session store."""
    if config.session_store == "redis":
        return RedisSessionStore(config.redis_url, config.idle_timeout_s, metrics)
    return MemoryStore(table, config.idle_timeout_s)


def open_prefix_store(config: ServerConfig, models: ServedModels) -> RedisPrefixStore | None:
    """The prefix cache's second level, if configured; the language models' reads then report their states."""
    if not config.prefix_cache_store_ttl_s or not config.prefix_cache_bytes:
        return None
    for model in models.all():
        if isinstance(model.engine, GenerationEngine):
            model.engine.publish_reads = True
    return RedisPrefixStore(config.redis_url, config.prefix_cache_store_ttl_s, config.prefix_cache_store_entries)


class LstmServer:
    """One server process's gRPC server and everything it holds."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        try:
            authenticator = Authenticator(config)
            tls = ServerTls(config) if config.tls_cert else None
            self.signer = StateSigner.from_settings(
                config.state_keys_file, config.state_keys, required=config.session_store == "redis"
            )
        except (AuthConfigError, StateKeyError) as error:
            raise StartupError(str(error)) from error
        registry = ModelRegistry(config)
        self.models = ServedModels(
            {
                name: ServedModel(loaded.entry, loaded.backend, engine_for(loaded, config, self.metrics))
                for name, loaded in registry.models.items()
            }
        )
        # without authentication every caller is the one tenant: only the server's own limits apply
        tenant_limits = (config.tenant_max_sessions, config.tenant_max_turns) if config.authenticated else ()
        table = SessionTable(config.max_sessions, config.idle_timeout_s, *tenant_limits)
        states = StateMessages(self.signer, self.models, config)
        self.metrics.serve_models({m.name: str(m.version) for m in self.models.all()})
        self.store = open_store(config, table, self.metrics)
        self.prefixes = open_prefix_store(config, self.models)
        self.sessions = SessionManager(config, self.models, table, self.metrics, self.store, states, self.prefixes)
        api = Api(config, self.sessions, self.models, states)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a used port must fail, not share it silently
        ]
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(self.metrics, config.replica_name, authenticator)], options=options
        )
        rpc.add_SessionsServicer_to_server(SessionsService(api), self.server)
        rpc.add_GenerationServicer_to_server(GenerationService(api), self.server)
        rpc.add_ClassificationServicer_to_server(ClassificationService(api), self.server)
        rpc.add_ModelsServicer_to_server(ModelsService(api), self.server)
        self.serving = False  # the health status is SERVING (the inference protocol's readiness)
        self.inference = InferenceService(api, lambda: self.serving)
        inference_rpc.add_GRPCInferenceServiceServicer_to_server(self.inference, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{config.host}:{config.port}"
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, tls.credentials())
        except RuntimeError as error:
            raise port_taken(address) from error
        self.http: HttpServer | None = None
        if config.http_port:
            try:
                http_socket = bind_http(config.host, config.http_port)
            except OSError as error:
                raise port_taken(f"{config.host}:{config.http_port}", "--http-port") from error
            front = Front(api, self.inference, authenticator)
            self.http = HttpServer(build_app(front, self.metrics, config.replica_name), config, http_socket)
        self._http = None
        self._reaper: asyncio.Task | None = None

    async def _set_health(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, status)

    async def start(self) -> None:
        """Connect to the session store (retrying: it may start after us), start the models, then serve."""
        try:
            await self.store.connect(self.config.store_connect_timeout_s)
        except ServiceError as error:
            raise StartupError(error.message) from error
        self.models.start()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        if self.config.metrics_port:
            try:
                self._http = self.metrics.serve_http(self.config.metrics_port, self.config.host)
            except OSError as error:
                await self.server.stop(0)
                raise StartupError(
                    f"cannot serve metrics on {self.config.host}:{self.config.metrics_port} ({error.strerror}): "
                    "choose another --metrics-port, or 0 for none"
                ) from error
        every = max(0.05, min(60.0, self.sessions.idle_limit_s / 4))
        self._reaper = asyncio.get_running_loop().create_task(self.sessions.reap_idle(every))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        http = {"http": f"{self.config.host}:{self.http.port}"} if self.http is not None else {}
        log.info(
            "serving",
            extra={"address": f"{self.config.host}:{self.port}", **http, "models": sorted(self.models.models)},
        )

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, wait the drain delay, refuse new calls, let running ones finish within the grace
        period, then stop."""
        grace = self.config.grace_period_s if grace is None else grace
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", extra={"drain_delay_s": self.config.drain_delay_s, "grace_s": grace})
        await asyncio.sleep(self.config.drain_delay_s)  # load balancers see NOT_SERVING before calls are refused
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        if self._reaper:
            self._reaper.cancel()
        await self.sessions.stop()  # every turn saved and its session free
        await self.models.stop()
        await self.store.close()
        if self.prefixes is not None:
            await self.prefixes.close()
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        log.info("stopped")


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = LstmServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop()
