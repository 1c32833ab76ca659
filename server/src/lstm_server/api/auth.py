"""Who is calling: bearer tokens and client certificates map a call to a tenant; TLS credentials.

- Bearer tokens: ``authorization: Bearer <token>`` metadata, checked against the ``--auth-tokens`` file
  ("TENANT TOKEN" lines, ``#`` comments). The file is re-read when its modification time or size changes, so
  tokens are added and revoked without a restart. Tokens are kept and looked up only as SHA-256 digests: how
  long a check takes depends on the digest of what the caller sent, which tells nothing about how much of a
  real token it matched (what a constant-time comparison guarantees).
- Client certificates (mTLS, ``--tls-client-ca``): the tenant is the subject CN of the verified certificate.
  A token, when one is sent, takes precedence.
- Without either, the server has one tenant, ``anonymous`` (allowed on loopback addresses only, or with
  ``--insecure-no-auth``).

TLS files (certificate, key, client CA) are re-read on change too: gRPC asks for them at each new connection.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import grpc
from cryptography import x509

from ..config import ANONYMOUS, ServerConfig
from ..errors import ServiceError, Status

log = logging.getLogger(__name__)
MAX_TENANT_CHARS = 128


class AuthConfigError(ValueError):
    """An authentication or TLS file cannot be used; the message names it and the problem."""


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def parse_tokens(text: str, where: str) -> dict[bytes, str]:
    """SHA-256 of each token -> its tenant."""
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise AuthConfigError(f"{where} line {number}: expected 'TENANT TOKEN', got {len(parts)} fields")
        tenant, token = parts
        if len(tenant) > MAX_TENANT_CHARS:
            raise AuthConfigError(f"{where} line {number}: tenant names are at most {MAX_TENANT_CHARS} characters")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in tokens:
            raise AuthConfigError(f"{where} line {number}: this token is listed twice")
        tokens[digest] = tenant
    return tokens


class TokenFile:
    """The ``--auth-tokens`` file, re-read when it changes; a bad new version keeps the last good one. Used on the
    event loop only (the interceptor), so it needs no lock."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:
            self._stamp = _stamp(self.path)
            self._tokens = parse_tokens(self.path.read_text(encoding="utf-8"), f"--auth-tokens {path}")
        except OSError as error:
            raise AuthConfigError(f"--auth-tokens {path}: cannot be read ({error.strerror})") from error

    def _refresh(self) -> None:
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            tokens = parse_tokens(self.path.read_text(encoding="utf-8"), f"--auth-tokens {self.path}")
        except (OSError, AuthConfigError, UnicodeDecodeError) as error:
            log.error("keeping the previous tokens: %s", error)
            return
        self._stamp, self._tokens = stamp, tokens
        log.info("re-read the token file", extra={"tenants": len(set(tokens.values()))})

    def tenant(self, token: str) -> str | None:
        self._refresh()
        return self._tokens.get(hashlib.sha256(token.encode()).digest())


def _unauthenticated(message: str) -> ServiceError:
    return ServiceError(Status.UNAUTHENTICATED, message)


class Authenticator:
    """Maps a call's metadata and TLS peer to its tenant, or refuses it (UNAUTHENTICATED)."""

    def __init__(self, config: ServerConfig) -> None:
        self.tokens = TokenFile(config.auth_tokens) if config.auth_tokens else None
        self.certificates = bool(config.tls_client_ca)
        self.enabled = config.authenticated

    def tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant of a gRPC call: its bearer token, else its verified client certificate's subject CN."""
        if not self.enabled:
            return ANONYMOUS
        names = ((context.auth_context() or {}).get("x509_common_name") or []) if self.certificates else []
        return self.tenant_of(context.invocation_metadata() or (), names, "metadata")

    def tenant_of(self, headers: Iterable[tuple[str, str]], common_names: list[bytes], carrier: str) -> str:
        """The tenant of a call with these (lowercase-keyed) headers and verified certificate CNs; ``carrier``
        names where headers travel in the caller's protocol ("metadata", "header")."""
        if not self.enabled:
            return ANONYMOUS
        header = next((v for k, v in headers if k == "authorization"), None)
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthenticated(f"the authorization {carrier} must be 'Bearer <token>'")
            tenant = self.tokens.tenant(token.strip()) if self.tokens is not None else None
            if tenant is None:
                raise _unauthenticated("unknown bearer token: check the token, or ask the operator for one")
            return tenant
        if common_names:
            try:
                name = common_names[0].decode("utf-8")
            except UnicodeDecodeError:
                name = ""
            if not 0 < len(name) <= MAX_TENANT_CHARS:  # never cut or mend a name: two would become one
                raise _unauthenticated(
                    f"the client certificate's subject CN must be 1 to {MAX_TENANT_CHARS} characters of UTF-8: "
                    "it names the tenant"
                )
            return name
        how = f"send 'authorization: Bearer <token>' {carrier}"
        if self.certificates and carrier == "metadata":
            how += " or connect with a client certificate"
        elif self.certificates:  # TLS verifies it, but the ASGI server does not pass it on to name a tenant
            how += " (over HTTP a client certificate is verified but names no tenant)"
        raise _unauthenticated(f"this server needs authentication: {how}")


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise AuthConfigError(f"{option} {path}: cannot be read ({error.strerror})") from error


def warn_if_not_valid_now(chain: bytes, path: str) -> None:
    """Log a warning when the first certificate of ``chain`` is expired or not yet valid: clients will refuse the
    connection and see only that the socket closed."""
    try:
        cert = x509.load_pem_x509_certificate(chain)
    except ValueError:
        return  # gRPC refuses what it cannot use, with its own message
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        state = "expired" if now > cert.not_valid_after_utc else "not yet valid"
        log.warning(
            "--tls-cert %s is %s (valid from %s to %s): clients will refuse to connect; issue a new certificate "
            "(the server re-reads the file at the next connection)",
            path,
            state,
            cert.not_valid_before_utc.isoformat(),
            cert.not_valid_after_utc.isoformat(),
        )


class ServerTls:
    """The server's TLS credentials; the files are re-read at a new connection after any of them changed."""

    def __init__(self, config: ServerConfig) -> None:
        self.files = {
            "--tls-cert": config.tls_cert,
            "--tls-key": config.tls_key,
            **({"--tls-client-ca": config.tls_client_ca} if config.tls_client_ca else {}),
        }
        self.require_client_auth = bool(config.tls_client_ca)
        self._stamps = self._current_stamps()
        self._initial = self._configuration()

    def _current_stamps(self) -> tuple:
        try:
            return tuple(_stamp(Path(p)) for p in self.files.values())
        except OSError as error:
            raise AuthConfigError(f"TLS file {error.filename}: cannot be read ({error.strerror})") from error

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        data = {option: _read(path, option) for option, path in self.files.items()}
        warn_if_not_valid_now(data["--tls-cert"], self.files["--tls-cert"])
        return grpc.ssl_server_certificate_configuration(
            [(data["--tls-key"], data["--tls-cert"])], root_certificates=data.get("--tls-client-ca")
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each new connection: a new configuration if a file changed, else None."""
        try:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            configuration = self._configuration()
        except AuthConfigError as error:
            log.error("keeping the previous TLS files: %s", error)
            return None
        self._stamps = stamps
        log.info("re-read the TLS files")
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.require_client_auth
        )
