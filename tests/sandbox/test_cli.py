"""``mobilepay-proxy sandbox`` arguments, and the real process start to finish."""

from __future__ import annotations

import re
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.sandbox.cli import build_parser, settings_from_args
from proxy.sandbox.settings import FaultSettings, SandboxSettings, TlsSettings
from tests.helpers.processes import Processes


def parse(argv: list[str], environ: dict[str, str] | None = None) -> SandboxSettings:
    return settings_from_args(build_parser(environ or {}).parse_args(argv))


def test_defaults() -> None:
    settings = parse([])
    # What the README and `make run` rely on: loopback, 8443, TLS in .sandbox, no faults.
    assert settings.host == "127.0.0.1"
    assert settings.port == 8443
    assert settings.tls == TlsSettings(Path(".sandbox"), ())
    assert settings.client_id == "demo-client"
    assert settings.client_secret == "demo-secret"
    assert settings.ibm_client_id == "demo-ibm-client"
    assert settings.token_lifetime_seconds == 3600
    assert settings.faults == FaultSettings(
        unauthorized_every=0,
        unauthorized_next=0,
        latency_ms=0,
        error_rate=0.0,
        errors_next=0,
        token_errors_next=0,
    )


def test_flags() -> None:
    settings = parse(
        [
            "--host=0.0.0.0",
            "--port=9443",
            "--tls-dir=/tmp/x",
            "--tls-hostname=sandbox",
            "--tls-hostname=mobilepay",
            "--client-id=c",
            "--client-secret=s",
            "--ibm-client-id=i",
            "--token-lifetime=60",
            "--unauthorized-every=5",
            "--unauthorized-next=1",
            "--latency-ms=20",
            "--error-rate=0.1",
            "--errors-next=2",
            "--token-errors-next=3",
        ]
    )
    assert settings.tls == TlsSettings(Path("/tmp/x"), ("sandbox", "mobilepay"))
    assert settings.faults == FaultSettings(
        unauthorized_every=5,
        unauthorized_next=1,
        latency_ms=20,
        error_rate=0.1,
        errors_next=2,
        token_errors_next=3,
    )
    assert (settings.client_id, settings.ibm_client_id) == ("c", "i")
    assert settings.token_lifetime_seconds == 60
    assert parse(["--no-tls"]).tls is None


def test_credentials_default_to_the_proxy_environment() -> None:
    settings = parse(
        [],
        {
            "MOBILEPAY_CLIENT_ID": "env-id",
            "MOBILEPAY_CLIENT_SECRET": "env-secret",
            "MOBILEPAY_IBM_CLIENT_ID": "env-ibm",
        },
    )
    assert settings.client_id == "env-id"
    assert settings.client_secret == "env-secret"
    assert settings.ibm_client_id == "env-ibm"


@pytest.mark.parametrize(
    "argv", [["--error-rate=1.5"], ["--latency-ms=-1"], ["--token-lifetime=0"]]
)
def test_out_of_range_values_are_rejected(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="must"):
        parse(argv)


@pytest.mark.slow
async def test_process_serves_tls_and_stops_on_sigterm(
    tmp_path: Path, processes: Processes
) -> None:
    tls_dir = tmp_path / "tls"
    running = await processes.start(
        sys.executable, "-m", "proxy.sandbox", "--port=0", f"--tls-dir={tls_dir}"
    )
    url = (await running.line(re.compile(r"listening on (\S+)"), 10))[1]
    trusting = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/_sandbox/health", ssl=trusting) as answer,
    ):
        assert answer.status == 200
    running.signal(signal.SIGTERM)
    assert await running.wait(10) == 0
