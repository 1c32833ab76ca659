"""How the clients reach a server: plaintext or TLS (optionally mutual), and the bearer token.

The token travels as ``authorization: Bearer <token>`` metadata that the client adds to every call itself, not
as gRPC call credentials (which grpc refuses on a plaintext channel). With TLS it is protected like any other
header. Without TLS it crosses the network in the clear: that is only for a server on this machine (loopback),
and a ``InsecureTokenWarning`` says so when the target is not a loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

Metadata = tuple[tuple[str, str], ...]
PathLike = str | os.PathLike[str]


class InsecureTokenWarning(UserWarning):
    """A token is sent without TLS to a server that is not on this machine."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a client (PEM file paths).

    ``ca``: the certificates that sign the server's (default: gRPC's default roots, the public CAs);
    ``cert`` and ``key``: this client's certificate chain and private key, for servers that require client
    certificates (mutual TLS; the server takes the tenant from the certificate's subject CN);
    ``server_name``: the name to check the server's certificate against, when it differs from the target's host
    (for instance when connecting by IP address to a certificate that names only a DNS name).
    """

    ca: PathLike | None = None
    cert: PathLike | None = None
    key: PathLike | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TlsConfig: cert and key go together (a client certificate needs its private key)")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; reads the files now (``OSError`` naming the file if one cannot be read)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def tls_config(tls: TlsConfig | bool | None) -> TlsConfig | None:
    """``None``/``False``: plaintext; ``True``: TLS with the default roots; a ``TlsConfig``: as it says."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return TlsConfig()
    if isinstance(tls, TlsConfig):
        return tls
    raise TypeError(f"tls must be a TlsConfig, True, False or None, not {type(tls).__name__}")


def auth_metadata(token: str | None) -> Metadata:
    """The metadata that carries ``token`` (none without a token)."""
    if token is None:
        return ()
    if not token or not token.isascii() or not token.isprintable() or any(ch.isspace() for ch in token):
        raise ValueError("the token must be non-empty printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine: localhost, 127.0.0.0/8, ::1, or a Unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :].split(",")[0]
            break
    if target.startswith("["):
        host = target[1:].split("]")[0]
    elif target.count(":") == 1:
        host = target.split(":")[0]
    else:
        host = target  # no port, or a bare IPv6 address
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The calls that change nothing on the server, so that gRPC may send them again (``retry_options``).
IDEMPOTENT = {
    "lstm.v1.Classification": ("Classify",),
    "lstm.v1.Generation": ("Step",),
    "lstm.v1.Models": ("ListModels", "DescribeModel"),
    "lstm.v1.Sessions": ("GetSession", "ListSessions", "ExportSession"),
}
MAX_RETRIES = 4  # gRPC makes at most 5 attempts of a call


def check_timeout(timeout: float | None) -> float | None:
    """A deadline in seconds: ``None`` (no deadline) or a finite number above 0 (``ValueError`` otherwise)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not (0 < timeout < math.inf):
        raise ValueError(f"timeout must be a finite number of seconds above 0, or None for no deadline; got {timeout}")
    return float(timeout)


def retry_options(retries: int, backoff: float) -> list[tuple[str, Any]]:
    """Channel options that make gRPC itself retry the ``IDEMPOTENT`` calls on UNAVAILABLE (a service config
    ``retryPolicy``): up to ``retries`` more attempts, the n-th after a random wait of up to
    ``backoff * 2**(n-1)`` seconds. At 0, no policy (gRPC only resends calls that never reached the server)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an integer from 0 to {MAX_RETRIES} (gRPC's limit), got {retries!r}")
    if not (0.001 <= backoff < math.inf):
        raise ValueError(f"backoff must be a finite number of seconds, at least 0.001, got {backoff!r}")
    if retries == 0:
        return []
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": f"{backoff:.9f}s",
        "maxBackoff": f"{backoff * 2 ** (retries - 1):.9f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for service, methods in IDEMPOTENT.items() for method in methods]
    config = {"methodConfig": [{"name": names, "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def merge_options(
    options: Sequence[tuple[str, Any]] | None, defaults: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    """``options`` plus the ``defaults`` whose keys they do not set (the caller's own win)."""
    given = {key for key, _ in options or ()}
    return [*(options or ()), *(option for option in defaults if option[0] not in given)]


def open_channel(
    target: str,
    *,
    tls: TlsConfig | bool | None,
    token: str | None,
    options: Sequence[tuple[str, Any]] | None,
    asyncio: bool = False,
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to ``target``, secure when ``tls`` says so; warns about a token sent in the clear off this
    machine."""
    config = tls_config(tls)
    if token is not None and config is None and not is_loopback(target):
        warnings.warn(
            f"the token is sent without TLS to {target}, which is not this machine: anyone on the path can read "
            "it; plaintext with a token is only for a server on loopback (pass tls=...)",
            InsecureTokenWarning,
            stacklevel=4,
        )
    module = grpc.aio if asyncio else grpc
    all_options = [*(options or []), *(config.channel_options() if config else [])]
    if config is None:
        return module.insecure_channel(target, options=all_options)
    return module.secure_channel(target, config.credentials(), options=all_options)
