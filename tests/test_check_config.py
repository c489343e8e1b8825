"""``check-config`` refuses exactly what start-up refuses, and a file it accepts starts.

Both run as an operator runs them: the real command line in a subprocess, with an explicit
environment, never a function call that could take a different path.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import CLIENT_SECRET
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.processes import PROXY, Processes
from tests.redis_server import RedisServer

# Each case starts the real command line twice, a second or more each.
pytestmark = pytest.mark.slow
# A proxy that should have refused its configuration but started is stopped after this.
REFUSAL_SECONDS = 10.0
TOKEN_URL = "https://127.0.0.1:1/integrator-authentication/connect/token"


def _write(directory: Path, ca_file: Path, settings: Mapping[str, object]) -> Path:
    """A configuration for a proxy on loopback; ``settings`` ("table.key": value) on top.

    The client secret comes from a file, as in the shipped configurations.
    """
    (directory / "client_secret.txt").write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    sections: dict[str, dict[str, object]] = {
        "server": {"drain_timeout_seconds": 1},
        "mobilepay": {"client_secret": None, "client_secret_file": "client_secret.txt"},
        "routing": {"merchants": {"store-001": "DK10000001"}},
    }
    for name, value in settings.items():
        table, _, key = name.partition(".")
        sections.setdefault(table, {})[key] = value
    data = proxy_config(TOKEN_URL, "https://127.0.0.1:1", ca_file, **sections)
    return write_config(directory / "proxy.toml", data)


def _run(processes: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    """The command; one that keeps running (it started) is stopped and reported as such."""
    try:
        return processes.run(*PROXY, *args, seconds=REFUSAL_SECONDS)
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"mobilepay-proxy {' '.join(args)} started instead of refusing:\n{output}")


# A CA file that exists but holds no certificate.
NOT_A_CA = "this is not a certificate\n"


@pytest.mark.parametrize(
    ("settings", "ca_text", "expected"),
    [
        pytest.param({}, NOT_A_CA, "holds no PEM CA certificate", id="ca-not-pem"),
        pytest.param(
            {"server.host": "0.0.0.O"}, None, "[server] host: cannot listen on", id="bad-host"
        ),
        pytest.param(
            {"server.metrics_host": "localhost.invalid"},
            None,
            "[server] metrics_host: cannot listen on",
            id="bad-metrics-host",
        ),
        pytest.param(
            {"mobilepay.api_base_url": "https://127.0.0.1:port"},
            None,
            "[mobilepay] api_base_url is not a valid URL",
            id="api-bad-port",
        ),
        pytest.param(
            {"tokens.store": "redis://127.0.0.1:6379/0?socket_timeout=soon"},
            None,
            "[tokens] store: Invalid value for 'socket_timeout'",
            id="redis-bad-option-value",
        ),
        pytest.param(
            {"tokens.store": "redis://127.0.0.1:6379/0?sockettimeout=1"},
            None,
            "names an option the Redis client does not know",
            id="redis-unknown-option",
        ),
        pytest.param(
            {"tokens.store": "rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes"},
            None,
            "Invalid SSL Certificate Requirements Flag",
            id="rediss-bad-cert-reqs",
        ),
        pytest.param(
            {"tokens.store": "redis://127.0.0.1:port/0"},
            None,
            "[tokens] store is not a valid URL",
            id="redis-bad-port",
        ),
        pytest.param(
            {"tokens.store": "redis://127.0.0.1:6379/zero"},
            None,
            "[tokens] store: the database must be a number",
            id="redis-bad-database",
        ),
        pytest.param(
            {"mobilepay.ca_file": "."},
            None,
            "is a directory, not a PEM file",
            id="ca-a-directory",
        ),
        pytest.param(
            {"mobilepay.ca_file": "absent.pem"},
            None,
            "absent.pem does not exist",
            id="ca-missing",
        ),
        pytest.param(
            {"mobilepay.client_secret_file": "absent.txt"},
            None,
            "[mobilepay] client_secret_file: cannot read",
            id="secret-file-missing",
        ),
    ],
)
def test_check_config_refuses_what_start_up_refuses(
    tmp_path: Path,
    ca_file: Path,
    processes: Processes,
    settings: dict[str, object],
    ca_text: str | None,
    expected: str,
) -> None:
    ca = ca_file
    if ca_text is not None:
        ca = tmp_path / "ca.pem"
        ca.write_text(ca_text, encoding="utf-8")
    config = _write(tmp_path, ca, settings)
    started = _run(processes, "--config", str(config))
    checked = _run(processes, "check-config", "--config", str(config))
    assert started.returncode == 2, f"start-up: {started.returncode} {started.stderr}"
    assert expected in started.stderr
    assert len(started.stderr.strip().splitlines()) == 1, started.stderr
    assert (checked.returncode, checked.stderr) == (2, started.stderr), checked.stdout


async def test_a_file_check_config_accepts_starts(
    tmp_path: Path, ca_file: Path, redis_server: RedisServer, processes: Processes
) -> None:
    config = _write(tmp_path, ca_file, {"tokens.store": redis_server.url})
    checked = _run(processes, "check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f"{config}: OK" in checked.stdout

    proxy = await processes.start_proxy(config)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.metrics_url}/healthz") as response,
    ):
        assert response.status == 200
    assert await proxy.running.stop() == 0, proxy.running.output
