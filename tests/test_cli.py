"""The command line as an operator uses it: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fakes import CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID, PosServer

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_config(
    path: Path,
    *,
    api: str,
    token: str,
    ca_file: Path,
    port: int = 0,
    metrics_port: int = 0,
    extra: str = "",
    extra_server: str = "",
) -> Path:
    secret = path.parent / "client_secret.txt"
    secret.write_text(CLIENT_SECRET + "\n")
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
metrics_host = "127.0.0.1"
metrics_port = {metrics_port}
drain_timeout_seconds = 10
{extra_server}

[mobilepay]
api_base_url = "{api}"
token_url = "{token}"
ca_file = "{ca_file}"
client_id = "{CLIENT_ID}"
client_secret_file = "client_secret.txt"
ibm_client_id = "{IBM_CLIENT_ID}"

[routing.merchants]
"store-001" = "DK10000001"
{extra}
"""
    )
    return path


def test_check_config_prints_a_summary_without_secrets(tmp_path: Path, ca_file: Path) -> None:
    config = _write_config(
        tmp_path / "proxy.toml",
        api="https://127.0.0.1:1",
        token="https://127.0.0.1:1/t",
        ca_file=ca_file,
    )
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "1 keys, 1 VATs" in result.stdout
    for secret in (CLIENT_SECRET, IBM_CLIENT_ID, CLIENT_ID):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("extra", "env", "expected"),
    [
        ('"store-002" = "DK123"', {}, "VAT 'DK123' must look like DK12345678"),
        ('"store 3" = "DK12345678"', {}, "the key must be 1-64 letters"),
        ("[tuning]\nfast = true", {}, "unknown key 'tuning'"),
        (
            '"store-004" = { vat = "DK12345678", networks = ["10.0.0.0/33"] }',
            {},
            "'10.0.0.0/33' is not a network",
        ),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(
    tmp_path: Path, ca_file: Path, extra: str, env: dict[str, str], expected: str
) -> None:
    config = _write_config(
        tmp_path / "proxy.toml",
        api="https://127.0.0.1:1",
        token="https://127.0.0.1:1/t",
        ca_file=ca_file,
        extra=extra,
    )
    for command in (["check-config"], []):
        result = _cli(*command, "--config", str(config), env=env)
        assert result.returncode == 2
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert CLIENT_SECRET not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server\nport = 1", "is not valid TOML"),
        ("[server]\nport = 'eighty'", "[server] port must be a whole number"),
        ("[server]\nport = 70000", "[server] port must be from 0 to 65535"),
        ('[mobilepay]\nenvironment = "staging"', "environment must be one of sandbox, production"),
        ('[mobilepay]\napi_base_url = "http://insecure"', "api_base_url must be an https:// URL"),
        ('[mobilepay]\nclient_id = "x"\nibm_client_id = "y"', "client_secret is missing"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(text)
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_and_secrets_from_environment(tmp_path: Path, ca_file: Path) -> None:
    result = _cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert (result.returncode, "cannot read" in result.stderr) == (2, True)
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[mobilepay]\nca_file = "{ca_file}"\n[routing.merchants]\n"s1" = "FI12345678"\n'
    )
    result = _cli("check-config", "--config", str(config))
    assert result.returncode == 2
    env = {
        "MOBILEPAY_CLIENT_ID": "a",
        "MOBILEPAY_CLIENT_SECRET": "b-secret-value",
        "MOBILEPAY_IBM_CLIENT_ID": "c-ibm-value",
    }
    result = _cli("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "b-secret-value" not in result.stdout
    assert "c-ibm-value" not in result.stdout


async def spawn_proxy(
    config: Path, stderr: int | None = None, log_level: str = "WARNING"
) -> asyncio.subprocess.Process:
    """``python -m proxy --config ...`` as an operator would start it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        "--log-level",
        log_level,
        cwd=ROOT,
        stderr=stderr,
    )


async def _wait_until_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never came up")


async def test_sigterm_drains_in_flight_requests_and_exits_0(
    tmp_path: Path, ca_file: Path, pos_server: PosServer
) -> None:
    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return web.json_response({"ok": True})

    pos_server.handler = slow
    port, metrics_port = _free_port(), _free_port()
    config = _write_config(
        tmp_path / "proxy.toml",
        api=pos_server.url,  # type: ignore[attr-defined]
        token=pos_server.tokens.url,  # type: ignore[attr-defined]
        ca_file=ca_file,
        port=port,
        metrics_port=metrics_port,
    )
    process = await spawn_proxy(config, stderr=asyncio.subprocess.PIPE)
    try:
        await _wait_until_up(f"http://127.0.0.1:{metrics_port}/healthz")
        base = f"http://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call(i: int) -> int:
                async with session.get(
                    f"{base}/pos/v10/payments/{i}", headers={"X-Merchant-Id": "store-001"}
                ) as response:
                    await response.read()
                    return response.status

            calls = [asyncio.create_task(call(i)) for i in range(200)]
            for _ in range(100):
                if len(pos_server.requests) >= 200:
                    break
                await asyncio.sleep(0.05)
            assert len(pos_server.requests) == 200
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.get(
                        f"{base}/pos/v10/payments/late", headers={"X-Merchant-Id": "store-001"}
                    ),
                ):
                    pass
            statuses = await asyncio.gather(*calls)
        assert statuses == [200] * 200
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode() if process.stderr else ""
    assert CLIENT_SECRET not in stderr
    assert "Traceback" not in stderr
