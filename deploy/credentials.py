"""The generated secrets of a stack (``docker-compose.yml``, ``make cluster``): TLS certificates, bearer tokens,
the state keys the replicas share, and the Redis password. Never committed: made at setup, on the machine.

    python deploy/credentials.py [DIR] [--server-names gateway ...] [--redis-address redis:6379]
                                 [--tenant dev] [--rotate-state-key]

DIR (default ``deploy/secrets``, what ``docker-compose.yml`` mounts) is created 0700, with a ``.gitignore`` of
``*`` so that git never sees it. It gets:

| file | what | used by |
|---|---|---|
| ``ca.pem``, ``ca-key.pem`` | the private CA (``certs.py``) | clients (``--ca``); the key signs the rest |
| ``server.pem``, ``server-key.pem`` | certificate for localhost, 127.0.0.1, ::1, ``--server-names`` | the gateway |
| ``auth-tokens`` | ``TENANT TOKEN`` lines; one random token for ``--tenant`` | replicas (``--auth-tokens``) |
| ``state-keys`` | ``KEY_ID SECRET`` lines; the first signs exported states | replicas (``--state-keys-file``) |
| ``redis-password`` | the Redis password (random) | the two files below |
| ``redis.conf`` | ``requirepass PASSWORD`` | redis-server |
| ``replica.toml`` | ``redis_url = "redis://:PASSWORD@ADDRESS/0"`` | replicas (``--config``) |

What exists is kept (CA, tokens, state keys, password): running it again fills in what is missing, re-issues the
server certificate for the names given and rewrites ``redis.conf`` and ``replica.toml``. ``--rotate-state-key``
puts a new signing key first and keeps the old ones after it (states they signed still import); drop an old line
once no state signed with it matters. More tenants: add ``TENANT TOKEN`` lines to ``auth-tokens`` (the replicas
re-read it). Files are 0644 inside the 0700 folder (the containers' users must read the ones mounted into them),
``ca-key.pem`` 0600.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import certs

DEFAULT_DIR = Path(__file__).resolve().parent / "secrets"
TENANT = "dev"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class StackSecrets:
    """Where the secrets are, and the ones a client or a test needs."""

    folder: Path
    tenant: str
    token: str  # the tenant's bearer token
    redis_password: str

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server-key.pem"

    @property
    def auth_tokens(self) -> Path:
        return self.folder / "auth-tokens"

    @property
    def state_keys(self) -> Path:
        return self.folder / "state-keys"

    @property
    def redis_conf(self) -> Path:
        return self.folder / "redis.conf"

    @property
    def replica_config(self) -> Path:
        return self.folder / "replica.toml"

    def redis_url(self, address: str) -> str:
        return f"redis://:{self.redis_password}@{address}/0"


def parse_pairs(path: Path) -> list[tuple[str, str]]:
    """The ``NAME VALUE`` lines of a file (``#`` comments and blank lines skipped)."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected two fields (NAME VALUE), got {len(parts)}")
        pairs.append((parts[0], parts[1]))
    return pairs


def read_token(path: Path, tenant: str) -> str:
    """The first token of ``tenant`` in an ``auth-tokens`` file."""
    for name, token in parse_pairs(path):
        if name == tenant:
            return token
    raise KeyError(f"{path}: no token for the tenant {tenant!r}")


def _write_new(path: Path, text: str) -> None:
    if not path.exists():
        certs.write_file(path, text.encode(), 0o644)


def write_stack_secrets(
    folder: Path = DEFAULT_DIR,
    server_names: Sequence[str] = (),
    *,
    redis_address: str = "redis:6379",
    tenant: str = TENANT,
    rotate_state_key: bool = False,
) -> StackSecrets:
    """Make or complete the secrets in ``folder`` (module doc) and return what a client needs."""
    if not NAME.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r}: letters, digits, '.', '_' and '-' only")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    _write_new(folder / ".gitignore", "# generated secrets (deploy/credentials.py): never commit them\n*\n")
    certs.write_dev_certs(folder, server_names)

    tokens = folder / "auth-tokens"
    _write_new(tokens, "# TENANT TOKEN: clients send 'authorization: Bearer TOKEN' (deploy/credentials.py)\n")
    if not any(name == tenant for name, _ in parse_pairs(tokens)):
        with open(tokens, "a") as handle:
            handle.write(f"{tenant} {secrets.token_urlsafe(32)}\n")

    keys = folder / "state-keys"
    existing = parse_pairs(keys) if keys.exists() else []
    if rotate_state_key or not existing:
        new = (f"k{secrets.token_hex(4)}", secrets.token_urlsafe(32))
        lines = "".join(f"{key_id} {secret}\n" for key_id, secret in [new, *existing])
        header = "# KEY_ID SECRET: the first signs exported session states; all of them are accepted\n"
        certs.write_file(keys, (header + lines).encode(), 0o644)

    password_file = folder / "redis-password"
    if not password_file.exists():
        certs.write_file(password_file, (secrets.token_hex(32) + "\n").encode(), 0o644)
    password = password_file.read_text().strip()
    made = StackSecrets(folder, tenant, read_token(tokens, tenant), password)
    certs.write_file(made.redis_conf, f"requirepass {password}\n".encode(), 0o644)
    replica = "# lstm-server --config: the session store, password included\n"
    replica += f'redis_url = "{made.redis_url(redis_address)}"\n'
    certs.write_file(made.replica_config, replica.encode(), 0o644)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, nargs="?", default=DEFAULT_DIR, help="default deploy/secrets")
    parser.add_argument("--server-names", nargs="*", default=["gateway"], help="names in the gateway's certificate")
    parser.add_argument("--redis-address", default="redis:6379", help="host:port of Redis as the replicas see it")
    parser.add_argument("--tenant", default=TENANT, help="the tenant whose token is made (default dev)")
    parser.add_argument("--rotate-state-key", action="store_true", help="a new signing key first, the old ones kept")
    args = parser.parse_args(argv)
    try:
        made = write_stack_secrets(
            args.dir,
            args.server_names,
            redis_address=args.redis_address,
            tenant=args.tenant,
            rotate_state_key=args.rotate_state_key,
        )
    except (OSError, ValueError) as error:
        print(f"credentials: {error}", file=sys.stderr)
        return 1
    print(f"credentials: in {made.folder}: CA {made.ca.name}, tokens {made.auth_tokens.name} (tenant {made.tenant})")
    print(f"credentials: connect with --ca {made.ca} and LSTM_CLIENT_TOKEN from {made.auth_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
