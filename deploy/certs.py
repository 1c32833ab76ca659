"""Development and test certificates: a private CA, server certificates and client certificates (mutual TLS).

    python deploy/certs.py OUTDIR [--server-names gateway ...] [--clients alice ...] [--days 30]

writes into OUTDIR (created 0700):

- ``ca.pem`` and ``ca-key.pem``: the CA (reused when OUTDIR already holds one, so that certificates issued
  before stay valid; ``--new-ca`` makes a new one);
- ``server.pem`` and ``server-key.pem``: a server certificate for ``localhost``, ``127.0.0.1``, ``::1`` and
  every ``--server-names`` entry (DNS names or IP addresses), for TLS servers (serverAuth);
- ``client-NAME.pem`` and ``client-NAME-key.pem`` per ``--clients NAME``: a client certificate whose subject CN
  is NAME (clientAuth); a server with ``--tls-client-ca ca.pem`` takes NAME as the caller's tenant.

Keys are ECDSA P-256, unencrypted PEM (PKCS#8), mode 0600 for the CA key and 0644 for the rest (inside the 0700
folder: containers running as other users must read the ones mounted into them). For development and tests only:
a production deployment gets its certificates from its own PKI. Tests import this module (``import certs``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, cert_path: Path, key_path: Path, key_mode: int = 0o644) -> None:
        write_file(cert_path, self.cert_pem(), 0o644)
        write_file(key_path, self.key_pem(), key_mode)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` with ``mode`` from the start (never readable by others in between), replacing atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, mode)  # the umask may have narrowed it
    os.replace(temporary, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lstm-serving development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: float) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # 5 min of clock skew


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "lstm-serving development CA", days: float = 3650) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = new_key()
    cert = (
        _builder(_name(common_name), _name(common_name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _subject_alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, without repeats
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return alt


def _issue(ca: Issued, common_name: str, usage: x509.ObjectIdentifier, names: Sequence[str], days: float) -> Issued:
    key = new_key()
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_subject_alt_names(names)), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_server_cert(
    ca: Issued, names: Sequence[str] = (), *, loopback: bool = True, days: float = DEFAULT_DAYS
) -> Issued:
    """A TLS server certificate for ``names`` (DNS names or IP addresses), plus localhost, 127.0.0.1 and ::1
    unless ``loopback`` is False. Its CN is the first name."""
    all_names = [*(LOOPBACK_NAMES if loopback else ()), *names]
    if not all_names:
        raise ValueError("a server certificate needs at least one name")
    return _issue(ca, all_names[0], ExtendedKeyUsageOID.SERVER_AUTH, all_names, days)


def make_client_cert(ca: Issued, common_name: str, *, days: float = DEFAULT_DAYS) -> Issued:
    """A TLS client certificate whose subject CN is ``common_name`` (the tenant, for a server doing mTLS)."""
    if not common_name:
        raise ValueError("a client certificate needs a common name")
    return _issue(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, (), days)


def load(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an ECDSA key")
    return Issued(cert, key)


@dataclass(frozen=True)
class DevCerts:
    """The paths ``write_dev_certs`` wrote."""

    folder: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name: (cert, key)


def write_dev_certs(
    folder: Path,
    server_names: Sequence[str] = (),
    clients: Sequence[str] = (),
    *,
    days: float = DEFAULT_DAYS,
    new_ca: bool = False,
) -> DevCerts:
    """Write a CA (or reuse the one in ``folder``), a server certificate and client certificates (module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_path, ca_key_path = folder / "ca.pem", folder / "ca-key.pem"
    if not new_ca and ca_path.exists() and ca_key_path.exists():
        ca = load(ca_path, ca_key_path)
    else:
        ca = make_ca()
        ca.write(ca_path, ca_key_path, key_mode=0o600)
    server = make_server_cert(ca, server_names, days=days)
    server.write(folder / "server.pem", folder / "server-key.pem")
    written = {}
    for name in clients:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"client name {name!r}: must be a plain file-name part")
        paths = (folder / f"client-{name}.pem", folder / f"client-{name}-key.pem")
        make_client_cert(ca, name, days=days).write(*paths)
        written[name] = paths
    return DevCerts(folder, ca_path, ca_key_path, folder / "server.pem", folder / "server-key.pem", written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Development and tests only; see deploy/README.md."
    )
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--server-names", nargs="*", default=[], help="more names of the server (e.g. gateway)")
    parser.add_argument("--clients", nargs="*", default=[], help="client certificates to issue, by CN (tenant)")
    parser.add_argument("--days", type=float, default=DEFAULT_DAYS, help="validity of the issued certificates")
    parser.add_argument("--new-ca", action="store_true", help="replace the CA in OUTDIR instead of reusing it")
    args = parser.parse_args(argv)
    try:
        made = write_dev_certs(args.outdir, args.server_names, args.clients, days=args.days, new_ca=args.new_ca)
    except (OSError, ValueError) as error:
        print(f"certs: {error}", file=sys.stderr)
        return 1
    print(f"certs: CA {made.ca}; server {made.server_cert} ({', '.join([*LOOPBACK_NAMES, *args.server_names])})")
    for name, (cert, _) in made.clients.items():
        print(f"certs: client {cert} (CN {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
