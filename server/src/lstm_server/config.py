"""Server configuration: defaults, then a TOML file, then ``LSTM_SERVER_*`` environment variables, then flags.

``ServerConfig`` is a pydantic model: every option is a typed field with its bounds or choices and a description,
every limit the server enforces is one of them, and ``lstm-server --help`` is built from the fields. A bad value, from
any source, is a ``ConfigError`` whose one line names the option as a flag and says what it accepts.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self, get_args, get_origin

from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

ENV_PREFIX = "LSTM_SERVER_"
ANONYMOUS = "anonymous"  # the one tenant of a server that runs without authentication
# A Classify request's characters at most (max_classify_texts x max_classify_chars): its texts and their token ids
# (up to 4 tokens a character, 4 bytes each) stay within about 100 MB. The model calls are bounded on their own
# (engine/classification.py's MAX_CALL_TOKENS).
MAX_CLASSIFY_REQUEST_CHARS = 4 * 1024 * 1024


class ConfigError(ValueError):
    """A bad option value; the message names the option and what it accepts."""


def _no_bool(value: Any) -> Any:
    """Refuse a boolean where a number belongs (pydantic would read TOML's ``true`` as 1)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "a boolean is not a number")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool)]
Backend = Literal["onnxruntime", "torchscript"]
LogLevel = Literal["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"]

# --help groups the options: each group starts at the field named here and runs to the next one
_SECTIONS = {
    "models": "server and models",
    "max_sessions": "sessions",
    "max_prompt_chars": "generation limits",
    "max_classify_texts": "classification limits",
    "max_message_bytes": "transport and logs",
    "tracing": "observability",
    "auth_tokens": "security (docs/security.md)",
    "tenant_max_sessions": "tenants (the per-tenant limits apply with authentication only) and listing",
}


class ServerConfig(BaseModel):
    """Every option of the server. ``ServerConfig(**values)`` reads no file, environment or flag (``load_config``
    does); a bad value is a pydantic ValidationError here, a ConfigError from ``load_config``."""

    model_config = ConfigDict(extra="forbid")

    # server and models
    models: str = Field("models", description="Model repository: the folder of NAME/VERSION/ entries to serve")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on (gRPC, HTTP and metrics); one that is not loopback needs authentication or "
        "--insecure-no-auth",
    )
    port: Int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    metrics_port: Int = Field(9090, ge=0, le=65535, description="Prometheus /metrics over HTTP on this port (0: off)")
    http_port: Int = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP port: KServe v2 REST, Triton's generate extension, OpenAI-compatible completions (0: off)",
    )
    http_body_timeout_s: Number = Field(
        30.0, gt=0, le=3600, description="An HTTP request's body must arrive within this many seconds (else 408)"
    )
    replica_name: str = Field(
        "",
        validate_default=True,
        description="This replica's name, in every response's x-replica metadata and in the logs (empty: the host "
        "name)",
    )
    backend: Backend = Field("onnxruntime", description="Runtime of the models")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device the models run on")
    model_backends: str = Field(
        "", description="Per-model runtime over --backend, as charlm=torchscript,sentiment=onnxruntime"
    )
    model_versions: str = Field(
        "", description="Per-model version pin, as charlm=1; an unpinned model serves its highest version"
    )
    threads: Int = Field(0, ge=0, le=1024, description="Intra-op threads per model (0: the number of cores)")
    model_threads: str = Field("", description="Per-model intra-op threads over --threads, as charlm=1,sentiment=2")
    single_thread_rows: Int = Field(
        0,
        ge=0,
        le=100_000,
        description="A language model's decode calls on at most this many rows run on one intra-op thread (less "
        "CPU, less throughput; 0: every call on the model's threads)",
    )
    thread_spinning: bool = Field(
        True,
        description="onnxruntime's idle intra-op threads busy-wait for the next call (faster wake-up, burns CPU); a "
        "language model's prompt reads never spin",
    )
    gil_switch_interval_ms: Number = Field(
        0.5,
        ge=0.01,
        le=1000,
        description="How long the model thread may wait for the GIL (sys.setswitchinterval; Python's default is 5)",
    )
    # sessions
    max_sessions: Int = Field(
        10000,
        ge=1,
        le=10_000_000,
        description="Sessions held in memory (and state slots per model); with a store the least recently used idle "
        "ones leave memory, without one a new session is refused",
    )
    idle_timeout_s: Number = Field(3600.0, ge=0.001, description="A session unused this long is closed")
    session_store: Literal["memory", "redis"] = Field(
        "memory", description="Where sessions live: memory (this process only) or redis (shared, survives restarts)"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The Redis of --session-store redis")
    evict_idle_s: Number = Field(
        300.0, ge=0.001, description="With a store: a session idle this long leaves memory (reloaded on demand)"
    )
    store_connect_timeout_s: Number = Field(
        60.0, ge=0, description="At start, retry the store this long before giving up"
    )
    # generation limits
    max_prompt_chars: Int = Field(8192, ge=1, le=100_000_000, description="Longest prompt or Step text, in characters")
    max_tokens_limit: Int = Field(
        4096, ge=0, le=100_000_000, description="The most characters one request may ask to generate"
    )
    default_max_tokens: Int = Field(
        200, ge=0, le=100_000_000, description="Characters to generate when a request does not say"
    )
    max_stop_strings: Int = Field(8, ge=0, le=1000, description="The most stop strings per request")
    max_batch: Int = Field(256, ge=1, le=100_000, description="Sessions stepped together in one model call")
    stream_buffer_chars: Int = Field(
        1024, ge=1, le=100_000_000, description="Generated but unsent characters before a session pauses"
    )
    stream_interval_ms: Number = Field(
        20.0,
        ge=0,
        le=60_000,
        description="A stream sends at most one message per interval (its first and last at once)",
    )
    stream_messages_per_s: Number = Field(
        2000.0,
        ge=0,
        le=10_000_000,
        description="All streams together send about this many messages a second (0: no cap)",
    )
    max_decode_steps: Int = Field(
        32, ge=1, le=4096, description="Characters per session per model call at most (1: one per call)"
    )
    decode_budget_ms: Number = Field(
        25.0, ge=0, le=60_000, description="A model call takes as many characters as fit in about this long"
    )
    decode_nice: Int = Field(
        10,
        ge=0,
        le=19,
        description="The decode thread's niceness over the server's other threads (0: the same), so that the event "
        "loop and prompt reads get a shared core first; applied where a model runs on one intra-op thread",
    )
    prefix_cache_bytes: Int = Field(
        64 * 1024 * 1024,
        ge=0,
        le=1 << 40,
        description="Memory per language model for the prefix cache: states after the openings read into fresh "
        "states, so a repeated opening is not read again (least recently used evicted first; 0: off)",
    )
    prefix_cache_stride: Int = Field(
        256,
        ge=0,
        le=100_000_000,
        description="The prefix cache also keeps the state every this many characters along an opening (0: only "
        "at its end)",
    )
    prefix_cache_store_ttl_s: Number = Field(
        0.0,
        ge=0,
        le=30 * 86400,
        description="With --session-store redis: the prefix cache's states also go to Redis for this long, so an "
        "opening one replica read serves the others (0: off)",
    )
    prefix_cache_store_entries: Int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description="The most prefix cache states Redis keeps per model version (the oldest written go first)",
    )
    prefix_cache_shared: str = Field(
        "",
        description="Models whose prefix cache all tenants share, as charlm,other (by default each tenant has its "
        "own: a hit's speed would tell one tenant what another sent)",
    )
    # classification limits
    max_classify_texts: Int = Field(
        256,
        ge=1,
        le=4096,
        description="The most texts per Classify request (times --max-classify-chars: 4194304 at most)",
    )
    max_classify_chars: Int = Field(
        4096,
        ge=1,
        le=8192,
        description="Longest text to classify, in characters (a text is read in one model call: up to 1 GB at 8192)",
    )
    classify_max_batch: Int = Field(
        64,
        ge=1,
        le=100_000,
        description="Texts classified together in one model call (fewer where they pass 16384 tokens)",
    )
    classify_max_delay_ms: Number = Field(
        2.0, ge=0, le=60_000, description="How long a text waits for others to share its model call"
    )
    inference_stream_requests: Int = Field(
        32,
        ge=1,
        le=10_000,
        description="Open Inference Protocol: requests of one ModelStreamInfer stream run at once (more wait unread)",
    )
    inference_stream_buffer: Int = Field(
        64,
        ge=1,
        le=100_000,
        description="Open Inference Protocol: responses of one stream waiting for its reader before its turns pause",
    )
    # transport and logs
    max_message_bytes: Int = Field(
        4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="Largest gRPC message, received or sent"
    )
    drain_delay_s: Number = Field(
        0.5, ge=0, description="On SIGTERM, NOT_SERVING is reported this long before new calls are refused"
    )
    grace_period_s: Number = Field(10.0, ge=0, description="Then running calls get this long to finish")
    log_level: LogLevel = Field("INFO", description="Least severe level of the JSON log lines on stderr")
    # observability
    tracing: Literal["off", "console", "otlp"] = Field(
        "off", description="OpenTelemetry spans: off, console (JSON lines on stderr) or otlp (to --otlp-endpoint)"
    )
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector of --tracing otlp")
    # security
    auth_tokens: str = Field("", description='File of "TENANT TOKEN" lines; clients send "authorization: Bearer TOKEN"')
    tls_cert: str = Field("", description="PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_client_ca: str = Field(
        "", description="PEM CA: require client certificates it signed (mTLS); the tenant is the subject CN"
    )
    insecure_no_auth: bool = Field(
        False, description="Allow a host that is not loopback without authentication: anyone who reaches it is served"
    )
    allow_batch_variance: bool = Field(
        False, description="Batch sessions on an entry whose manifest does not prove it batch-invariant"
    )
    state_keys_file: str = Field(
        "", description='File of "KEY_ID SECRET" lines that sign exported states: the first signs, all are accepted'
    )
    state_keys: str = Field("", description="The same keys inline, as id1:secret1,id2:secret2")
    # per-tenant limits
    tenant_max_sessions: Int = Field(1000, ge=1, le=10_000_000, description="Sessions one tenant may hold")
    tenant_max_turns: Int = Field(256, ge=1, le=100_000, description="Turns one tenant may run at once (a full batch)")
    list_page_size: Int = Field(100, ge=1, le=100_000, description="ListSessions: the page when a request gives none")
    list_max_page_size: Int = Field(1000, ge=1, le=100_000, description="ListSessions: the largest page")

    @field_validator("replica_name")
    @classmethod
    def _default_replica_name(cls, name: str) -> str:
        return name or os.uname().nodename

    @field_validator("model_backends")
    @classmethod
    def _check_model_backends(cls, setting: str) -> str:
        return _check_per_model(setting, lambda value: value in get_args(Backend), "onnxruntime or torchscript")

    @field_validator("model_versions")
    @classmethod
    def _check_model_versions(cls, setting: str) -> str:
        return _check_per_model(setting, str.isdigit, "a whole version number, as in charlm=1")

    @field_validator("model_threads")
    @classmethod
    def _check_model_threads(cls, setting: str) -> str:
        return _check_per_model(
            setting,
            lambda value: value.isdigit() and 1 <= int(value) <= 1024,
            "a whole number of threads from 1 to 1024, as in charlm=1,sentiment=2",
        )

    @field_validator("prefix_cache_shared")
    @classmethod
    def _check_prefix_cache_shared(cls, setting: str) -> str:
        if setting and not all(name.strip() for name in setting.split(",")):
            raise PydanticCustomError("model_names", "model names separated by commas, as charlm,other")
        return setting

    def prefix_cache_shared_by(self, model: str) -> bool:
        """Whether ``model``'s prefix cache is shared by all tenants (``prefix_cache_shared``)."""
        return model in {name.strip() for name in self.prefix_cache_shared.split(",")}

    @model_validator(mode="after")
    def _check_together(self) -> Self:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"--default-max-tokens: must be at most --max-tokens-limit ({self.max_tokens_limit}), "
                f"got {self.default_max_tokens}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key: give both (PEM files) to serve TLS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca: client certificates need TLS: give --tls-cert and --tls-key too")
        if self.max_classify_texts * self.max_classify_chars > MAX_CLASSIFY_REQUEST_CHARS:
            raise ValueError(
                f"--max-classify-texts x --max-classify-chars: a request of {self.max_classify_texts} texts of "
                f"{self.max_classify_chars} characters is {self.max_classify_texts * self.max_classify_chars} "
                f"characters; the most is {MAX_CLASSIFY_REQUEST_CHARS}: lower one of them"
            )
        if self.prefix_cache_store_ttl_s and self.session_store != "redis":
            raise ValueError("--prefix-cache-store-ttl-s: the prefix cache's second level needs --session-store redis")
        if self.list_page_size > self.list_max_page_size:
            raise ValueError(
                f"--list-page-size: must be at most --list-max-page-size ({self.list_max_page_size}), "
                f"got {self.list_page_size}"
            )
        if not (self.authenticated or self.insecure_no_auth or is_loopback(self.host)):
            raise ValueError(
                f"--host {self.host}: not a loopback address, and no authentication is configured: give "
                "--auth-tokens FILE or --tls-client-ca FILE, or pass --insecure-no-auth to serve anyone who "
                "can reach the port"
            )
        return self

    @property
    def authenticated(self) -> bool:
        """Callers prove a tenant (bearer token or client certificate)."""
        return bool(self.auth_tokens or self.tls_client_ca)

    def backend_for(self, model: str) -> str:
        """The runtime of ``model``: its ``model_backends`` entry, else ``backend``."""
        return _per_model(self.model_backends).get(model, self.backend)

    def threads_for(self, model: str) -> int:
        """Intra-op threads for ``model``: its ``model_threads`` entry, else ``threads``, else the number of cores."""
        threads = _per_model(self.model_threads).get(model)
        return int(threads) if threads else self.threads or os.cpu_count() or 1

    def version_for(self, model: str) -> int | None:
        """The pinned version of ``model``, or None for the highest in the repository."""
        version = _per_model(self.model_versions).get(model)
        return int(version) if version else None


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


def _check_per_model(setting: str, valid: Callable[[str], bool], expected: str) -> str:
    """``setting`` if each of its ``model=value`` entries has a ``valid`` value; else say the first bad one."""
    for model, value in _per_model(setting).items():
        if not valid(value):
            raise ValueError(f"{model}={value!r}: give each model {expected}")
    return setting


# -- what each option accepts, for --help, the documentation and the error messages -----------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _number(value: float) -> str:
    """``value`` as a reader types it: whole numbers in full (``2147483647``, not ``2.14748e+09``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _choices(field: FieldInfo) -> tuple[str, ...]:
    return get_args(field.annotation) if get_origin(field.annotation) is Literal else ()


def _kind(field: FieldInfo) -> str:
    """What a value of ``field`` is, as in "must be an integer"."""
    if _choices(field):
        return "one of " + ", ".join(_choices(field))
    kinds: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return kinds[field.annotation]


def _range(field: FieldInfo) -> str:
    """``"from 1 to 100"``, ``">= 0.001"``, or ``""`` for a field without bounds."""
    low = next((item.ge for item in field.metadata if isinstance(item, Ge)), None)
    high = next((item.le for item in field.metadata if isinstance(item, Le)), None)
    if low is None:
        return ""
    return f">= {_number(low)}" if high is None else f"from {_number(low)} to {_number(high)}"


def _default(field: FieldInfo) -> str:
    value = field.get_default()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return _number(value)
    return value


def _metavar(field: FieldInfo) -> str:
    if _choices(field):
        return "{" + ",".join(_choices(field)) + "}"
    metavars: dict[Any, str] = {bool: "BOOL", int: "INT", float: "NUMBER", str: "TEXT"}
    return metavars[field.annotation]


def options_markdown() -> str:
    """The options as a Markdown table (docs/server.md holds it; tests/server/test_config.py keeps it current)."""
    rows = ["| option | accepts | default | what it does |", "|---|---|---|---|"]
    for name, field in ServerConfig.model_fields.items():
        accepts = f"{_kind(field)} {_range(field)}".strip()
        default = f"`{_default(field)}`" if _default(field) else "empty"
        rows.append(f"| `{_flag(name)}` | {accepts} | {default} | {field.description} |")
    return "\n".join(rows) + "\n"


# -- errors ----------------------------------------------------------------------------------------------------


def _explain(error: ValidationError, origins: Mapping[str, str]) -> str:
    """All of ``error``'s problems on one line; ``origins`` says where a value came from, by field name."""
    return "; ".join(_problem(details, origins) for details in error.errors())


def _problem(details: ErrorDetails, origins: Mapping[str, str]) -> str:
    """One problem as ``--option: what is wrong``; a rule across options names them in its own message."""
    if not details["loc"]:
        return str(details.get("ctx", {}).get("error", details["msg"]))
    name = str(details["loc"][0])
    field = ServerConfig.model_fields[name]
    if details["type"] == "value_error":
        problem = str(details.get("ctx", {}).get("error", details["msg"]))
    elif details["type"] in ("greater_than_equal", "less_than_equal"):
        value = TypeAdapter(field.annotation).validate_python(details["input"])
        problem = f"must be a number {_range(field)}, got {value!r}"
    else:
        problem = f"must be {_kind(field)}, got {details['input']!r}"
    where = f" ({origins[name]})" if name in origins else ""
    return f"{_flag(name)}: {problem}{where}"


# -- the sources -----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a ConfigError (one line) rather than the usage and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (lstm-server --help lists the options)")


def _build_parser() -> argparse.ArgumentParser:
    """``lstm-server``'s flags: ``--config FILE`` and one per option, each with its description, type or choices,
    bounds, default and environment variable."""
    made = _Parser(
        prog="lstm-server",
        allow_abbrev=False,  # --max-b is no option: a new option would change what it means
        usage="%(prog)s [--config FILE] [--OPTION VALUE ...]",
        description="gRPC server for the LSTM models (docs/server.md).",
        epilog=f"Each option comes from its default, then the --config file (TOML, by the underscored name: "
        f"max_batch = 64), then its environment variable ({ENV_PREFIX}MAX_BATCH=64), then its flag, each over the "
        f"one before. A boolean flag alone means true; booleans take true/false, yes/no, on/off or 1/0. Keys in the "
        f"file that name no option are an error; {ENV_PREFIX}* variables that name no option are ignored.",
    )
    made.add_argument("--config", type=Path, metavar="FILE", help="TOML file with any of the options below")
    groups = {name: made.add_argument_group(title) for name, title in _SECTIONS.items()}
    group = groups["models"]
    for name, field in ServerConfig.model_fields.items():
        group = groups.get(name, group)
        facts = [_range(field)] if _range(field) else []
        facts += [f"default {_default(field) or 'empty'}", f"env {_env(name)}"]
        flag = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        group.add_argument(
            _flag(name),
            dest=name,
            metavar=_metavar(field),
            help=f"{field.description} [{'; '.join(facts)}]".replace("%", "%%"),
            **flag,
        )
    return made


def _read_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The options in the TOML file at ``path``, and the keys in it that name no option; a ConfigError if it cannot
    be read."""
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot be read as TOML ({error})") from error
    unknown = sorted(set(values) - set(ServerConfig.model_fields))
    return {k: v for k, v in values.items() if k not in unknown}, unknown


def load_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Merge defaults, ``--config FILE`` (TOML), the environment (``os.environ`` unless given) and ``argv`` (the
    process's arguments unless given), each over the one before. ``--help`` prints the options and exits."""
    environ = os.environ if environ is None else environ
    args = _build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []  # every one is reported, in one line
    if args.config:
        known, unknown = _read_file(args.config)
        values |= known
        origins |= dict.fromkeys(values, f"in {args.config}")
        if unknown:
            problems.append(f"--config {args.config}: unknown options {unknown}")
    for name in ServerConfig.model_fields:
        if _env(name) in environ:
            values[name], origins[name] = environ[_env(name)], f"from {_env(name)}"
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
            origins.pop(name, None)
    try:
        config = ServerConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError("; ".join([*problems, _explain(error, origins)])) from error
    if problems:
        raise ConfigError("; ".join(problems))
    return config
