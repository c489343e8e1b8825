"""``check-config`` refuses exactly what start-up refuses, and a file it accepts starts.

Both run as an operator runs them: the real command line in a subprocess, with an explicit
environment, never a function call that could take a different path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import Exposure
from tests.fakes import CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
# Each case starts the real command line twice, a second or more each.
pytestmark = pytest.mark.slow
# A proxy that should have refused its configuration but started is stopped after this.
REFUSAL_SECONDS = 10.0
START_SECONDS = 15.0


def _environment() -> dict[str, str]:
    """Only what a service manager would pass: no credentials, no log level."""
    return {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write(directory: Path, ca_file: Path, settings: Mapping[str, object]) -> Path:
    """A configuration for a proxy on loopback; ``settings`` ("table.key": value) on top."""
    (directory / "client_secret.txt").write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    tables: dict[str, dict[str, object]] = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1"},
        "mobilepay": {
            "api_base_url": "https://127.0.0.1:1",
            "token_url": "https://127.0.0.1:1/integrator-authentication/connect/token",
            "ca_file": str(ca_file),
            "client_id": CLIENT_ID,
            "client_secret_file": "client_secret.txt",
            "ibm_client_id": IBM_CLIENT_ID,
        },
        "tokens": {},
        "routing.merchants": {'"store-001"': "DK10000001"},
    }
    tables["server"].update(metrics_port=0, drain_timeout_seconds=1)
    for name, value in settings.items():
        table, _, key = name.rpartition(".")
        tables[table][key] = value
    # JSON's strings and numbers are TOML's too.
    text = "".join(
        f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
        for table, keys in tables.items()
    )
    config = directory / "proxy.toml"
    config.write_text(text, encoding="utf-8")
    return config


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """The command; one that keeps running (it started) is stopped and reported as such."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            capture_output=True,
            text=True,
            timeout=REFUSAL_SECONDS,
            cwd=ROOT,
            env=_environment(),
            check=False,
        )
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
    exposure: Exposure,
    settings: dict[str, object],
    ca_text: str | None,
    expected: str,
) -> None:
    ca = ca_file
    if ca_text is not None:
        ca = tmp_path / "ca.pem"
        ca.write_text(ca_text, encoding="utf-8")
    config = _write(tmp_path, ca, settings)
    started = _run("--config", str(config))
    checked = _run("check-config", "--config", str(config))
    for result in (started, checked):
        exposure.texts.append(result.stdout + result.stderr)
    assert started.returncode == 2, f"start-up: {started.returncode} {started.stderr}"
    assert expected in started.stderr
    assert len(started.stderr.strip().splitlines()) == 1, started.stderr
    assert (checked.returncode, checked.stderr) == (2, started.stderr), checked.stdout


def test_a_file_check_config_accepts_starts(
    tmp_path: Path, ca_file: Path, redis_server: RedisServer, exposure: Exposure
) -> None:
    metrics_port = _free_port()
    config = _write(
        tmp_path,
        ca_file,
        {"server.metrics_port": metrics_port, "tokens.store": redis_server.url},
    )
    checked = _run("check-config", "--config", str(config))
    exposure.texts.append(checked.stdout + checked.stderr)
    assert checked.returncode == 0, checked.stderr
    assert f"{config}: OK" in checked.stdout

    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=_environment(),
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert process.poll() is None, f"exited with {process.returncode}"
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/healthz", timeout=1
                ) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "no /healthz within the deadline"
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        exposure.texts.append(stderr.decode(errors="replace"))
    assert process.returncode == 0, stderr.decode(errors="replace")
