"""Server configuration: defaults, then a TOML file, then ``LSTM_SERVER_*`` environment variables, then flags.

Every limit the server enforces is a field here, so each one is explicit and
configurable the same three ways. ``lstm-server --help`` lists them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "LSTM_SERVER_"
ANONYMOUS = "anonymous"  # the one tenant of a server that runs without authentication


class ConfigError(ValueError):
    """A bad option value; the message names the option and what it accepts."""


@dataclass
class ServerConfig:
    models: str = "models"  # model repository root
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090  # Prometheus metrics over HTTP; 0 turns them off
    replica_name: str = field(default_factory=lambda: os.uname().nodename)
    backend: str = "onnxruntime"  # default runtime: onnxruntime or torchscript
    device: str = "cpu"  # cpu or cuda
    model_backends: str = ""  # per-model override, "charlm=torchscript,sentiment=onnxruntime"
    model_versions: str = ""  # per-model pin, "charlm=1"; unpinned models serve their highest version
    threads: int = 0  # intra-op threads per model; 0 means the number of cores
    model_threads: str = ""  # per-model override of threads, "charlm=1,sentiment=2"
    thread_spinning: bool = True  # onnxruntime's idle intra-op threads busy-wait (fast wake-up, burns CPU)
    gil_switch_interval_ms: float = 0.5  # how long the model thread may wait for the GIL (Python's default is 5)
    # sessions
    max_sessions: int = 10000
    idle_timeout_s: float = 3600.0
    session_store: str = "memory"  # memory (this process only) or redis (shared by replicas, survives restarts)
    redis_url: str = "redis://127.0.0.1:6379/0"
    evict_idle_s: float = 300.0  # with a store: sessions idle this long leave memory (reloaded on demand)
    store_connect_timeout_s: float = 60.0  # at start, retry the store this long before giving up
    # generation limits
    max_prompt_chars: int = 8192
    max_tokens_limit: int = 4096  # the most a request may ask for
    default_max_tokens: int = 200
    max_stop_strings: int = 8
    max_batch: int = 256  # sessions stepped together
    stream_buffer_chars: int = 1024  # generated but unsent characters before a session pauses
    stream_interval_ms: float = 20.0  # a stream sends at most one message per interval (first and last at once)
    stream_messages_per_s: float = 2000.0  # all streams together send about this many messages a second (0: no cap)
    max_decode_steps: int = 32  # characters per session per model call at most (1: one character per call)
    decode_budget_ms: float = 10.0  # a model call takes as many characters as fit in about this long
    # classification limits
    max_classify_texts: int = 256
    max_classify_chars: int = 4096  # per text
    classify_max_batch: int = 64
    classify_max_delay_ms: float = 2.0
    # transport
    max_message_bytes: int = 4 * 1024 * 1024
    drain_delay_s: float = 0.5  # on SIGTERM, NOT_SERVING is reported this long before new calls are refused
    grace_period_s: float = 10.0  # then running calls get this long to finish
    log_level: str = "INFO"
    # observability (docs/observability.md)
    tracing: str = "off"  # OpenTelemetry spans: off, console (JSON lines on stderr) or otlp (to --otlp-endpoint)
    otlp_endpoint: str = "http://127.0.0.1:4317"  # OTLP/gRPC collector for --tracing otlp
    # security (docs/security.md)
    auth_tokens: str = ""  # file of "TENANT TOKEN" lines; clients send "authorization: Bearer TOKEN"
    tls_cert: str = ""  # PEM certificate chain: serve TLS (with tls_key)
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA: require client certificates it signed (mTLS); the tenant is the subject CN
    insecure_no_auth: bool = False  # allow a non-loopback host without authentication
    state_keys_file: str = ""  # "KEY_ID SECRET" lines: the first signs exported states, all are accepted
    state_keys: str = ""  # the same inline, "id1:secret1,id2:secret2" (for LSTM_SERVER_STATE_KEYS)
    # per-tenant limits in this process, with authentication (without it, the one tenant is the whole server)
    tenant_max_sessions: int = 1000  # sessions one tenant may hold
    tenant_max_turns: int = 256  # turns one tenant may run at once (a full batch)
    list_page_size: int = 100  # ListSessions: the default page
    list_max_page_size: int = 1000  # and the largest
    allow_batch_variance: bool = False  # batch sessions on an entry not proven batch-invariant

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                accepts = f">= {low:g}" if high == float("inf") else f"from {low:g} to {high:g}"
                raise ConfigError(f"{_option(name)}: must be a number {accepts}, got {value!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{_option(name)}: must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"--default-max-tokens: must be at most --max-tokens-limit ({self.max_tokens_limit}), "
                f"got {self.default_max_tokens}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key: give both (PEM files) to serve TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca: client certificates need TLS: give --tls-cert and --tls-key too")
        for model, value in _per_model(self.model_threads).items():
            if not value.isdigit() or not 1 <= int(value) <= 1024:
                raise ConfigError(
                    f"--model-threads: {model}={value!r}: give each model a whole number of threads from 1 to 1024, "
                    "as in charlm=1,sentiment=2"
                )
        if self.list_page_size > self.list_max_page_size:
            raise ConfigError("--list-page-size: must be at most --list-max-page-size")
        if not (self.authenticated or self.insecure_no_auth or is_loopback(self.host)):
            raise ConfigError(
                f"--host {self.host}: not a loopback address, and no authentication is configured: give "
                "--auth-tokens FILE or --tls-client-ca FILE, or pass --insecure-no-auth to serve anyone who "
                "can reach the port"
            )

    @property
    def authenticated(self) -> bool:
        """Callers prove a tenant (bearer token or client certificate)."""
        return bool(self.auth_tokens or self.tls_client_ca)

    def backend_for(self, model: str) -> str:
        return _per_model(self.model_backends).get(model, self.backend)

    def threads_for(self, model: str) -> int:
        """Intra-op threads for ``model``: its ``model_threads`` entry, else ``threads``, else the number of cores."""
        threads = _per_model(self.model_threads).get(model)
        return int(threads) if threads else self.threads or os.cpu_count() or 1

    def version_for(self, model: str) -> int | None:
        """The pinned version of ``model``, or None for the highest in the repository."""
        version = _per_model(self.model_versions).get(model)
        return int(version) if version else None


INF = float("inf")
LIMITS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "metrics_port": (0, 65535),
    "threads": (0, 1024),
    "gil_switch_interval_ms": (0.01, 1000),
    "max_sessions": (1, 10_000_000),
    "idle_timeout_s": (0.001, INF),
    "evict_idle_s": (0.001, INF),
    "store_connect_timeout_s": (0, INF),
    "max_prompt_chars": (1, 100_000_000),
    "max_tokens_limit": (0, 100_000_000),
    "default_max_tokens": (0, 100_000_000),
    "max_stop_strings": (0, 1000),
    "max_batch": (1, 100_000),
    "stream_buffer_chars": (1, 100_000_000),
    "stream_interval_ms": (0, 60_000),
    "stream_messages_per_s": (0, 10_000_000),
    "max_decode_steps": (1, 4096),
    "decode_budget_ms": (0, 60_000),
    "max_classify_texts": (1, 100_000),
    "max_classify_chars": (1, 100_000_000),
    "classify_max_batch": (1, 100_000),
    "classify_max_delay_ms": (0, 60_000),
    "max_message_bytes": (1024, 2**31 - 1),
    "drain_delay_s": (0, INF),
    "grace_period_s": (0, INF),
    "tenant_max_sessions": (1, 10_000_000),
    "tenant_max_turns": (1, 100_000),
    "list_page_size": (1, 100_000),
    "list_max_page_size": (1, 100_000),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "backend": ("onnxruntime", "torchscript"),
    "device": ("cpu", "cuda"),
    "session_store": ("memory", "redis"),
    "tracing": ("off", "console", "otlp"),
    "log_level": tuple(logging.getLevelNamesMapping()),
}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_loopback(host: str) -> bool:
    """``host`` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _per_model(setting: str) -> dict[str, str]:
    """``"a=x, b=y"`` as ``{"a": "x", "b": "y"}``."""
    pairs = (item.partition("=") for item in setting.split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """``raw`` (from a flag, the environment or the file) as the option's type; ConfigError if it is not one."""
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            if str(raw).strip().lower() in TRUE + FALSE:
                return str(raw).strip().lower() in TRUE
            raise ValueError
        if kind in (int, "int"):
            if isinstance(raw, float) or isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind in (float, "float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
    except (TypeError, ValueError):
        what = {"bool": "true or false", "int": "an integer", "float": "a number"}[getattr(kind, "__name__", kind)]
        raise ConfigError(f"{_option(name)}: must be {what}, got {raw!r}") from None
    return str(raw)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Merge defaults, ``--config FILE`` (TOML), environment and flags, in that order of precedence.

    ConfigError names the first bad option and what it accepts."""
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="lstm-server", description="gRPC server for the LSTM models")
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below (underscored names)")
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        flag = {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {}
        parser.add_argument(
            _option(f.name),
            dest=f.name,
            default=None,
            help=f"default {getattr(defaults, f.name)!r}; env {ENV_PREFIX}{f.name.upper()}",
            **flag,
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as handle:
                file_values = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"--config {args.config}: cannot be read as TOML ({error})") from error
        unknown = set(file_values) - {f.name for f in fields(ServerConfig)}
        if unknown:
            raise ConfigError(f"--config {args.config}: unknown options {sorted(unknown)}")
        values.update(file_values)
    for f in fields(ServerConfig):
        if ENV_PREFIX + f.name.upper() in environ:
            values[f.name] = environ[ENV_PREFIX + f.name.upper()]
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return ServerConfig(
        **{f.name: _convert(f.name, f.type, values[f.name]) for f in fields(ServerConfig) if f.name in values}
    )
