"""A private CA and a server certificate so the simulator can speak HTTPS.

The files are created once and reused: the CA survives restarts, so a proxy
configured with ``ca.pem`` keeps trusting the simulator. The server
certificate is reissued by the same CA when it lacks a requested name or
nears its end. Every file is written to a temporary name and renamed into
place, so a process waiting for ``ca.pem`` never reads half a file.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=365)
# Reissue well before the end, so a long-running setup never sees it lapse.
RENEW_BEFORE = datetime.timedelta(days=30)

_Name: TypeAlias = x509.DNSName | x509.IPAddress


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only the private CA."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def ensure_tls_files(directory: Path, hostnames: Iterable[str] = ()) -> TlsFiles:
    """Create or reuse the CA and a server certificate covering ``hostnames``.

    ``localhost``, ``127.0.0.1`` and ``::1`` are always covered.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
    names = _subject_names([*DEFAULT_NAMES, *hostnames])
    now = datetime.datetime.now(datetime.UTC)
    with _locked(directory):
        ca = _load_ca(directory, now)
        if ca is None:
            logger.info("creating a private CA in %s", directory)
            ca = _create_ca(directory, now)
        ca_cert, ca_key = ca
        if not _server_cert_usable(files, ca_cert, names, now):
            logger.info("issuing a server certificate for %s", ", ".join(map(_name_text, names)))
            _issue_server_cert(files, ca_cert, ca_key, names, now)
    return files


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two simulators starting at once on one directory must not mint two CAs.
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _subject_names(hostnames: Iterable[str]) -> list[_Name]:
    names: list[_Name] = []
    for hostname in dict.fromkeys(hostnames):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
        except ValueError:
            names.append(x509.DNSName(hostname))
    return names


def _name_text(name: _Name) -> str:
    return str(name.value)


def _write_atomically(path: Path, data: bytes, *, private: bool = False) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            if not private:
                os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(
    directory: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if key.public_key() != cert.public_key() or cert.not_valid_after_utc - now < RENEW_BEFORE:
        return None
    return cert, key


def _create_ca(
    directory: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MobilePay sandbox simulator CA")])
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(certificate_authority=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a reader that sees ca.pem may rely on the whole set.
    _write_atomically(directory / CA_KEY, _pem_key(key), private=True)
    _write_atomically(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _server_cert_usable(
    files: TlsFiles, ca_cert: x509.Certificate, names: list[_Name], now: datetime.datetime
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
        covered = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        key.public_key() == cert.public_key()
        and cert.not_valid_after_utc - now >= RENEW_BEFORE
        and all(name in covered for name in names)
    )


def _issue_server_cert(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[_Name],
    now: datetime.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = next(
        (name.value for name in names if isinstance(name, x509.DNSName)), "localhost"
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(certificate_authority=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_atomically(files.server_key, _pem_key(key), private=True)
    _write_atomically(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def _key_usage(*, certificate_authority: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_authority,
        crl_sign=certificate_authority,
        encipher_only=False,
        decipher_only=False,
    )
