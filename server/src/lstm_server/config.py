"""Server configuration: defaults, then a TOML file, then ``LSTM_SERVER_*`` environment variables, then flags.

Every limit the server enforces is a field here, so each one is explicit and
configurable the same three ways. ``lstm-server --help`` lists them.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "LSTM_SERVER_"


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

    def backend_for(self, model: str) -> str:
        return _per_model(self.model_backends).get(model, self.backend)

    def version_for(self, model: str) -> int | None:
        """The pinned version of ``model``, or None for the highest in the repository."""
        version = _per_model(self.model_versions).get(model)
        return int(version) if version else None


def _per_model(setting: str) -> dict[str, str]:
    """``"a=x, b=y"`` as ``{"a": "x", "b": "y"}``."""
    pairs = (item.partition("=") for item in setting.split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}


def _convert(kind: Any, raw: Any) -> Any:
    if kind in (int, "int"):
        return int(raw)
    if kind in (float, "float"):
        return float(raw)
    return str(raw)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Merge defaults, ``--config FILE`` (TOML), environment and flags, in that order of precedence."""
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="lstm-server", description="gRPC server for the LSTM models")
    parser.add_argument("--config", type=Path, help="TOML file with any of the options below (underscored names)")
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"default {getattr(defaults, f.name)!r}; env {ENV_PREFIX}{f.name.upper()}",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as handle:
            file_values = tomllib.load(handle)
        unknown = set(file_values) - {f.name for f in fields(ServerConfig)}
        if unknown:
            parser.error(f"{args.config}: unknown options {sorted(unknown)}")
        values.update(file_values)
    for f in fields(ServerConfig):
        if ENV_PREFIX + f.name.upper() in environ:
            values[f.name] = environ[ENV_PREFIX + f.name.upper()]
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    try:
        return ServerConfig(
            **{f.name: _convert(f.type, values[f.name]) for f in fields(ServerConfig) if f.name in values}
        )
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits
