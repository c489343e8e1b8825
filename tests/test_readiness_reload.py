"""Token-aware readiness, the token expiry gauge, and SIGHUP reloads of a running process."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MERCHANTS, RunningProxy
from tests.fakes import PosServer, TokenServer
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.processes import Processes
from tests.helpers.waiting import eventually

RELOAD_REJECTED = re.compile("reload rejected, the running configuration stays in force")


async def _readyz(proxy: RunningProxy) -> tuple[int, dict[str, Any]]:
    async with proxy.session.get(proxy.metrics_url + "/readyz") as response:
        return response.status, await response.json()


async def test_readiness_reports_tokens_per_merchant_without_values(
    proxy: RunningProxy, token_server: TokenServer
) -> None:
    status, body = await _readyz(proxy)
    assert status == 200
    assert len(body["tokens"]) == len(set(MERCHANTS.values()))
    assert not any(entry["valid"] for entry in body["tokens"])

    await proxy.request("GET", "/pos/v10/stores/s1", merchant="store-003")
    status, body = await _readyz(proxy)
    held = [entry for entry in body["tokens"] if entry["valid"]]
    assert [entry["merchant_vat"] for entry in held] == [MERCHANTS["store-003"]]
    assert 3500 < held[0]["expires_in_seconds"] <= 3600
    assert token_server.issued[0] not in str(body)

    metrics = await proxy.metrics()
    line = f'mobilepay_proxy_token_expiry_seconds{{merchant_vat="{MERCHANTS["store-003"]}"}}'
    assert line in metrics
    assert metrics.count("mobilepay_proxy_token_expiry_seconds{") == 1


async def test_unready_while_the_token_service_keeps_failing(
    start_proxy: Callable[..., Any], token_server: TokenServer
) -> None:
    proxy: RunningProxy = await start_proxy(
        tokens={
            "unready_after_seconds": 0.3,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.1,
        }
    )

    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    token_server.fault = failing
    assert (await proxy.request("GET", "/pos/v10/stores/s1"))[0] == 503
    assert (await _readyz(proxy))[0] == 200  # not failing for long enough yet

    async def unready() -> bool:
        return (await _readyz(proxy))[0] == 503

    await eventually(unready, "unready once failing for 0.3 s")
    status, body = await _readyz(proxy)
    assert status == 503
    assert body["token_service"]["failing_for_seconds"] >= 0.3
    token_server.fault = None
    await asyncio.sleep(0.15)
    assert (await proxy.request("GET", "/pos/v10/stores/s1"))[0] == 200
    assert (await _readyz(proxy))[0] == 200


@pytest.mark.slow
async def test_sighup_reloads_the_merchant_map(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    processes: Processes,
) -> None:
    def write(key: str, vat: str) -> Path:
        merchants = {"store-001": "DK10000001", key: vat}
        data = proxy_config(
            token_server.url, pos_server.url, ca_file, routing={"merchants": merchants}
        )
        return write_config(tmp_path / "proxy.toml", data)

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("sleep", "0")))
        return web.json_response({"ok": True})

    pos_server.handler = slow
    config = write("store-002", "DK10000002")
    started = await processes.start_proxy(config)
    process = started.running
    base = f"{started.url}/pos/v10/payments/p"
    metrics = f"{started.metrics_url}/metrics"
    try:
        async with aiohttp.ClientSession() as session:

            async def call(key: str, query: str = "") -> int:
                async with session.get(base + query, headers={"X-Merchant-Id": key}) as r:
                    await r.read()
                    return r.status

            assert await call("store-001") == 200
            assert await call("store-002") == 200
            in_flight = asyncio.create_task(call("store-002", "?sleep=1"))
            await eventually(lambda: len(pos_server.requests) == 3, "the slow request sent")
            # store-002 leaves, store-003 arrives.
            write("store-003", "DK10000003")
            process.signal(signal.SIGHUP)
            for _ in range(50):
                if await call("store-003") == 200:
                    break
                await asyncio.sleep(0.1)
            assert await call("store-003") == 200
            assert await call("store-002") == 403
            assert await in_flight == 200, "an in-flight request was cut by the reload"
            async with session.get(metrics) as r:
                text = await r.text()
            assert 'merchant_vat="DK10000002"' not in text
            assert 'merchant_vat="DK10000003"' in text

            # An invalid file is rejected; the running map stays.
            write("store-004", "NOTAVAT")
            process.signal(signal.SIGHUP)
            await process.line(RELOAD_REJECTED)
            assert await call("store-003") == 200
            assert await call("store-001") == 200
        process.signal(signal.SIGTERM)
        assert await process.wait(10) == 0
    finally:
        await process.stop()
    stderr = process.output
    assert "reload rejected, the running configuration stays in force" in stderr
    assert "NOTAVAT" in stderr
    assert "Traceback" not in stderr
