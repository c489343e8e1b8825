"""The private CA and server certificate: created once, reused, extended."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from proxy.sandbox.settings import SandboxSettings, TlsSettings
from proxy.sandbox.tls import ensure_tls_files

from .conftest import StartSandbox


def names(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in san}


def test_files_are_created_private_and_complete(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "tls"
    files = ensure_tls_files(directory, ["sandbox"])
    assert {path.name for path in directory.iterdir()} == {
        ".lock",
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
    }
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.ca_cert.stat().st_mode) == 0o644
    assert names(files.server_cert) == {"localhost", "127.0.0.1", "::1", "sandbox"}
    # The chain verifies the way a client of the simulator checks it.
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(files.server_cert.read_bytes()).verify_directly_issued_by(ca)


def test_files_are_reused(tmp_path: Path) -> None:
    first = ensure_tls_files(tmp_path, ["sandbox"])
    contents = {path: path.read_bytes() for path in tmp_path.glob("*.pem")}
    second = ensure_tls_files(tmp_path, ["sandbox"])
    assert second == first
    assert {path: path.read_bytes() for path in tmp_path.glob("*.pem")} == contents
    # A subset of the names is covered already, too.
    ensure_tls_files(tmp_path)
    assert {path: path.read_bytes() for path in tmp_path.glob("*.pem")} == contents


def test_new_names_reissue_the_server_certificate_under_the_same_ca(tmp_path: Path) -> None:
    files = ensure_tls_files(tmp_path)
    ca_before = files.ca_cert.read_bytes()
    server_before = files.server_cert.read_bytes()
    ensure_tls_files(tmp_path, ["sandbox", "10.0.0.7"])
    assert files.ca_cert.read_bytes() == ca_before
    assert files.server_cert.read_bytes() != server_before
    assert {"sandbox", "10.0.0.7"} <= names(files.server_cert)


def test_damaged_files_are_replaced(tmp_path: Path) -> None:
    files = ensure_tls_files(tmp_path)
    ca_before = files.ca_cert.read_bytes()
    files.server_cert.write_text("garbage")
    ensure_tls_files(tmp_path)
    assert files.ca_cert.read_bytes() == ca_before
    assert names(files.server_cert) >= {"localhost"}
    (tmp_path / "ca-key.pem").write_text("garbage")
    ensure_tls_files(tmp_path)
    assert files.ca_cert.read_bytes() != ca_before
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(files.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert not list(tmp_path.glob(".*.pem.*")), "temporary files left behind"


async def test_clients_must_trust_the_ca(start_sandbox: StartSandbox) -> None:
    client = await start_sandbox()
    assert client.url.scheme == "https"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(client.url.with_path("/_sandbox/health"))
        assert client.running.tls is not None
        trusting = ssl.create_default_context(cafile=str(client.running.tls.ca_cert))
        localhost = client.url.with_host("localhost")
        async with session.get(localhost.with_path("/_sandbox/health"), ssl=trusting) as answer:
            assert answer.status == 200


async def test_plain_http_when_tls_is_off(start_sandbox: StartSandbox) -> None:
    client = await start_sandbox(tls=None)
    assert client.url.scheme == "http"
    assert await client.admin("GET", "/health") == {"status": "ok"}


def test_default_settings_serve_tls_on_8443() -> None:
    settings = SandboxSettings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8443)
    assert settings.tls == TlsSettings(Path(".sandbox"), ())
    assert "demo-secret" not in repr(settings)
