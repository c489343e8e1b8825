"""Several copies of the proxy sharing one real Redis behave as one towards the token endpoint."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import asyncio as aioredis

from proxy.tokens.shared import _derive_key
from tests.conftest import MERCHANTS, RunningProxy
from tests.fakes import CLIENT_ID, CLIENT_SECRET, PosServer, TokenServer
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.ports import host_port
from tests.helpers.processes import Processes
from tests.redis_server import RedisServer

KEYS = list(MERCHANTS)


class Copies:
    """Proxy processes sharing one configuration (and so one Redis)."""

    def __init__(self, starter: Processes) -> None:
        self.starter = starter
        self.processes: list[asyncio.subprocess.Process] = []
        self.ports: list[int] = []

    async def start(
        self,
        tmp_path: Path,
        count: int,
        pos: PosServer,
        tokens: TokenServer,
        ca_file: Path,
        redis: RedisServer,
        lock_seconds: float = 10,
    ) -> None:
        for index in range(count):
            directory = tmp_path / f"copy{index}"
            directory.mkdir()
            data = proxy_config(
                tokens.url,
                pos.url,
                ca_file,
                tokens={"store": redis.url, "redis_lock_seconds": lock_seconds},
            )
            started = await self.starter.start_proxy(write_config(directory / "proxy.toml", data))
            self.processes.append(started.running.process)
            self.ports.append(host_port(started.url)[1])

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _get(session: aiohttp.ClientSession, port: int, key: str, i: int) -> int:
    async with session.get(
        f"http://127.0.0.1:{port}/pos/v10/payments/{i}", headers={"X-Merchant-Id": key}
    ) as response:
        await response.read()
        return response.status


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
async def test_copies_fetch_one_token_per_merchant_under_cold_load(
    tmp_path: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    ca_file: Path,
    redis_server: RedisServer,
    processes: Processes,
    count: int,
) -> None:
    copies = Copies(processes)
    try:
        await copies.start(tmp_path, count, pos_server, token_server, ca_file, redis_server)
        token_server.delay = 0.3
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            statuses = await asyncio.gather(
                *(_get(session, copies.ports[i % count], KEYS[i % 10], i) for i in range(600))
            )
        assert statuses == [200] * 600
        assert token_server.count() == 10
        for vat in MERCHANTS.values():
            assert token_server.count(vat) == 1
        # Every copy sent each merchant's one token.
        for vat in MERCHANTS.values():
            used = {
                r.headers["Authorization"]
                for r in pos_server.requests
                if r.headers["X-MobilePay-Merchant-VAT-Number"] == vat
            }
            assert used == {f"Bearer {token_server.issued_for[vat][0]}"}

        # A forced-refresh storm across every copy costs one fetch.
        pos_server.rejected.add(token_server.issued_for[MERCHANTS["store-001"]][0])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            statuses = await asyncio.gather(
                *(_get(session, copies.ports[i % count], "store-001", i) for i in range(300))
            )
        assert statuses == [200] * 300
        assert token_server.count(MERCHANTS["store-001"]) == 2
    finally:
        await copies.stop()


@pytest.mark.slow
async def test_a_dead_lock_holder_blocks_refreshes_only_until_the_lock_expires(
    tmp_path: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    ca_file: Path,
    redis_server: RedisServer,
    processes: Processes,
) -> None:
    copies = Copies(processes)
    try:
        await copies.start(
            tmp_path, 2, pos_server, token_server, ca_file, redis_server, lock_seconds=1
        )
        token_server.delay = 5
        async with aiohttp.ClientSession() as session:
            doomed = asyncio.create_task(_get(session, copies.ports[0], "store-001", 1))
            for _ in range(50):
                if token_server.count():
                    break
                await asyncio.sleep(0.05)
            assert token_server.count() == 1  # the first copy holds the lock and is fetching
            copies.processes[0].send_signal(signal.SIGKILL)
            token_server.delay = 0
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await _get(session, copies.ports[1], "store-001", 2) == 200
            assert loop.time() - started < 3.0
            with pytest.raises(aiohttp.ClientError):
                await doomed
        assert token_server.count() == 2
    finally:
        await copies.stop()


async def test_tokens_are_encrypted_at_rest_with_their_remaining_life(
    start_proxy: Callable[..., Any], token_server: TokenServer, redis_server: RedisServer
) -> None:
    proxy: RunningProxy = await start_proxy(tokens={"store": redis_server.url})
    assert (await proxy.request("GET", "/pos/v10/payments/1"))[0] == 200
    token = token_server.issued[0]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [key async for key in client.scan_iter("mobilepay-proxy:*")]
        dump = b"".join([await client.get(k) or b"" for k in keys if not k.endswith(b"lock")])
        ttls = [await client.pttl(k) for k in keys if k.count(b":") == 2]
    finally:
        await client.aclose()
    assert token.encode() not in dump
    assert CLIENT_SECRET.encode() not in dump
    assert CLIENT_ID.encode() not in b"".join(keys)
    assert ttls
    assert all(3000_000 < ttl <= 3600_000 for ttl in ttls)
    assert len(_derive_key(CLIENT_ID, CLIENT_SECRET)) == 32


@pytest.mark.slow
async def test_redis_outage_mid_load_fails_no_terminal_request(
    start_proxy: Callable[..., Any], token_server: TokenServer, redis_server: RedisServer
) -> None:
    token_server.lifetime = token_server.expires_in = 3  # refreshes during the outage
    sections = {"tokens": {"store": redis_server.url, "redis_timeout_seconds": 0.2}}
    copies: list[RunningProxy] = [await start_proxy(**sections) for _ in range(2)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 7
    statuses: list[int] = []

    async def terminal(n: int) -> None:
        while loop.time() < deadline:
            status, _, _ = await copies[n % 2].request(
                "GET", f"/pos/v10/payments/{n}", merchant=KEYS[n % 4]
            )
            statuses.append(status)
            await asyncio.sleep(0.01)

    async def outage() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(2.5)
        await asyncio.to_thread(redis_server.start)

    await asyncio.gather(outage(), *(terminal(n) for n in range(20)))
    assert len(statuses) > 500
    assert set(statuses) == {200}
    for proxy in copies:
        assert (
            proxy.sample("mobilepay_proxy_token_store_errors_total", {"operation": "load"})
            + proxy.sample("mobilepay_proxy_token_store_errors_total", {"operation": "subscribe"})
            >= 1
        )
    for _ in range(50):
        if all(proxy.sample("mobilepay_proxy_token_store_up") == 1 for proxy in copies):
            break
        await asyncio.sleep(0.1)
    assert all(proxy.sample("mobilepay_proxy_token_store_up") == 1 for proxy in copies)
