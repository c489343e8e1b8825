"""Log output as operators meet it: JSON or text lines, every access line kept, no secret.

The proxy runs as a real process (``python -m proxy``); its whole stderr goes through the
secrets guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_config
from tests.conftest import Exposure
from tests.fakes import PosServer
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.processes import Processes, Proxy
from tests.helpers.waiting import eventually

ACCESS_FIELDS = {
    "peer",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "merchant",
    "token_fingerprint",
    "attempts",
    "request_id",
    "mobilepay_correlation_id",
}
MERCHANT = {"X-Merchant-Id": "store-001"}


@dataclass
class Spawned:
    proxy: Proxy

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def metrics_url(self) -> str:
        return self.proxy.metrics_url

    async def stop(self) -> list[str]:
        """SIGTERM, wait for a clean exit, and return every line it wrote."""
        assert await self.proxy.running.stop() == 0
        return self.lines()

    async def exited(self) -> list[str]:
        """Wait for an exit already asked for (never a second SIGTERM); every line written."""
        assert await self.proxy.running.wait() == 0
        return self.lines()

    def lines(self) -> list[str]:
        return [line.rstrip("\n") for line in self.proxy.running.lines]


@contextlib.asynccontextmanager
async def spawned(
    processes: Processes,
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    *args: str,
    env: Mapping[str, str] | None = None,
    **sections: Any,
) -> AsyncIterator[Spawned]:
    data = proxy_config(pos_server.tokens.url, pos_server.url, ca_file, **sections)
    config = write_config(tmp_path / "proxy.toml", data)
    yield Spawned(await processes.start_proxy(config, *args, env=env))


async def _get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:
        await response.read()
        return response.status, response.headers["X-Request-Id"]


def _json_lines(lines: list[str], exposure: Exposure) -> list[dict[str, Any]]:
    exposure.texts.extend(lines)
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), line
        parsed.append(record)
    return parsed


async def test_json_logs_are_one_object_a_line_with_access_fields_and_no_secret(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    exposure: Exposure,
    processes: Processes,
) -> None:
    async def conflict(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(
            {"code": "1301", "message": "busy", "correlationId": "mp-corr-1"}, status=409
        )

    async with spawned(processes, tmp_path, ca_file, pos_server, "--log-format", "json") as proxy:
        async with aiohttp.ClientSession() as session:
            ok = await _get(
                session,
                f"{proxy.url}/pos/v10/payments/p1",
                headers={**MERCHANT, "X-Request-Id": "till-1"},
            )
            refused = await _get(
                session, f"{proxy.url}/pos/v10/payments/p1", headers={"X-Merchant-Id": "nope"}
            )
            pos_server.handler = conflict
            relayed = await _get(session, f"{proxy.url}/pos/v10/payments/p2", headers=MERCHANT)
            async with session.get(f"{proxy.metrics_url}/metrics") as response:
                exposure.texts.append(await response.text())
        lines = await proxy.stop()
    assert (ok, refused[0], relayed[0]) == ((200, "till-1"), 403, 409)
    records = _json_lines(lines, exposure)
    access = {r["request_id"]: r for r in records if r["logger"] == "proxy.access"}
    assert set(access) == {"till-1", refused[1], relayed[1]}
    first = access["till-1"]
    assert first.keys() >= ACCESS_FIELDS
    assert first["level"] == "INFO"
    assert (first["method"], first["route"], first["path"]) == (
        "GET",
        "/pos/v10/payments/{paymentid}",
        "/pos/v10/payments/p1",
    )
    assert (first["status"], first["merchant"], first["attempts"]) == (200, "store-001", 1)
    assert isinstance(first["duration_ms"], float)
    assert len(first["token_fingerprint"]) == 12
    assert first["peer"] == "127.0.0.1"
    assert first["mobilepay_correlation_id"] is None
    assert (access[refused[1]]["status"], access[refused[1]]["merchant"]) == (403, None)
    assert access[relayed[1]]["mobilepay_correlation_id"] == "mp-corr-1"
    assert any(r["message"].startswith("serving terminals on") for r in records)


@pytest.mark.slow
async def test_workers_log_json_too(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    exposure: Exposure,
    processes: Processes,
) -> None:
    async with spawned(
        processes, tmp_path, ca_file, pos_server, "--log-format", "json", server={"workers": 2}
    ) as proxy:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                async with session.get(f"{proxy.metrics_url}/readyz") as response:
                    return response.status == 200

            await eventually(ready, "both workers ready")
            for _ in range(20):
                assert (await _get(session, f"{proxy.url}/pos/v10/stores/s", headers=MERCHANT))[
                    0
                ] == 200
        lines = await proxy.stop()
    records = _json_lines(lines, exposure)
    assert {r["worker"] for r in records if r["logger"] == "proxy.access"} <= {0, 1}
    assert len([r for r in records if r["logger"] == "proxy.access"]) == 20
    assert any(r.get("supervisor") is True for r in records)
    assert {r["worker"] for r in records if "worker" in r} == {0, 1}


async def test_the_flag_beats_the_environment_which_beats_the_file(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    exposure: Exposure,
    processes: Processes,
) -> None:
    async with spawned(
        processes,
        tmp_path,
        ca_file,
        pos_server,
        logging={"format": "json"},
        env={"MOBILEPAY_PROXY_LOG_FORMAT": "text"},
    ) as proxy:
        lines = await proxy.stop()
    exposure.texts.extend(lines)
    assert lines
    assert not any(line.startswith("{") for line in lines)
    async with spawned(
        processes,
        tmp_path,
        ca_file,
        pos_server,
        "--log-format",
        "json",
        env={"MOBILEPAY_PROXY_LOG_FORMAT": "text"},
    ) as proxy:
        lines = await proxy.stop()
    assert _json_lines(lines, exposure)


@pytest.mark.slow  # a proxy process, 250 requests and a drain
async def test_every_answered_request_has_its_access_line_after_sigterm(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    exposure: Exposure,
    processes: Processes,
) -> None:
    async def slowish(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.json_response({"ok": True})

    pos_server.handler = slowish
    answered: list[str] = []
    async with spawned(processes, tmp_path, ca_file, pos_server) as proxy:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call(n: int) -> None:
                status, request_id = await _get(
                    session,
                    f"{proxy.url}/pos/v10/payments/p{n}",
                    headers={**MERCHANT, "X-Request-Id": f"req-{n}"},
                )
                assert (status, request_id) == (200, f"req-{n}")
                answered.append(request_id)

            # Answered well before the signal: their lines sit in the buffer.
            await asyncio.gather(*(call(n) for n in range(150)))
            # In flight when the signal comes: answered during the drain.
            late = [asyncio.create_task(call(n)) for n in range(150, 250)]

            async def all_upstream() -> bool:
                return len(pos_server.requests) == 250

            await eventually(all_upstream, "250 requests at the upstream")
            proxy.proxy.running.signal(signal.SIGTERM)
            await asyncio.gather(*late)
        lines = await proxy.exited()
    logged = [
        line.split("request_id=")[1].split()[0] for line in lines if " proxy.access: " in line
    ]
    assert sorted(logged) == sorted(answered)
    assert len(answered) == 250


def test_logging_settings_are_checked() -> None:
    def parsed(logging: dict[str, Any], environ: dict[str, str] | None = None) -> str:
        data: dict[str, Any] = {
            "mobilepay": {"client_id": "a", "client_secret": "b", "ibm_client_id": "c"},
            "routing": {"merchants": {"s1": "DK12345678"}},
            "logging": logging,
        }
        config = parse_config(data, base_dir=Path("."), environ=environ or {})
        return config.logging.format

    assert parsed({}) == "text"
    assert parsed({"format": "json"}) == "json"
    assert parsed({"format": "json"}, {"MOBILEPAY_PROXY_LOG_FORMAT": "text"}) == "text"
    with pytest.raises(ConfigError, match=r"\[logging\] format must be one of text, json"):
        parsed({"format": "yaml"})
    with pytest.raises(ConfigError, match="MOBILEPAY_PROXY_LOG_FORMAT must be one of"):
        parsed({}, {"MOBILEPAY_PROXY_LOG_FORMAT": "JSON"})
    with pytest.raises(ConfigError, match="unknown key 'level'"):
        parsed({"level": "INFO"})
