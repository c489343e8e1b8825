"""Several copies of the proxy sharing one real Redis behave as one towards the token endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidTag
from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis

from proxy.app import STATE, apply_config
from proxy.config import RedisStoreConfig
from proxy.metrics import Metrics
from proxy.tokens.shared import RedisTokenStore, derive_key, open_sealed
from proxy.tokens.store import SharedToken
from tests.conftest import MERCHANTS, RunningProxy
from tests.fakes import CLIENT_ID, CLIENT_SECRET, PosServer, TokenServer
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.ports import host_port
from tests.helpers.processes import Processes
from tests.redis_server import RedisServer
from tests.test_money_safety import (
    ROTATED_ID,
    ROTATED_SECRET,
    accept_rotated_credentials,
    reloaded,
)

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
        redis_timeout: float = 1.0,
    ) -> None:
        """``redis_timeout``: a Redis call slower than this counts as an outage, after
        which a copy fetches on its own. The default leaves room for a stalled machine; a
        copy that took a pause for an outage would fetch a second token."""
        for index in range(count):
            directory = tmp_path / f"copy{index}"
            directory.mkdir()
            data = proxy_config(
                tokens.url,
                pos.url,
                ca_file,
                tokens={
                    "store": redis.url,
                    "redis_lock_seconds": lock_seconds,
                    # The lock must outlive a fetch (timeout + 3 Redis calls + 0.5 s).
                    "timeout_seconds": lock_seconds / 2,
                    "redis_timeout_seconds": redis_timeout,
                },
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
            tmp_path,
            2,
            pos_server,
            token_server,
            ca_file,
            redis_server,
            lock_seconds=2,
            redis_timeout=0.1,  # the lock must outlive a 1 s fetch and three Redis calls
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


def _encodings(token: str) -> list[bytes]:
    """The token and every way it could sit in a blob unencrypted: base64 (standard and
    URL-safe, at each of the three alignments, padded or not), hex, and its JWT parts."""
    raw = token.encode()
    found = [raw, raw.hex().encode(), *(part.encode() for part in token.split(".") if part)]
    for skip in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            # Drop the last, partial quantum: it depends on what follows in the blob.
            found.append(encode(raw[skip:])[:-4])
    return found


async def test_tokens_are_encrypted_at_rest_with_their_remaining_life(
    start_proxy: Callable[..., Any], token_server: TokenServer, redis_server: RedisServer
) -> None:
    proxy: RunningProxy = await start_proxy(tokens={"store": redis_server.url})
    assert (await proxy.request("GET", "/pos/v10/payments/1"))[0] == 200
    (token,) = token_server.issued
    vat = MERCHANTS["store-001"]
    key = f"mobilepay-proxy:{hashlib.sha256(CLIENT_ID.encode()).hexdigest()[:16]}:{vat}"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [name async for name in client.scan_iter("mobilepay-proxy:*")]
        values = [await client.get(k) for k in keys if not k.endswith(b"lock")]
        dump = b"".join(value for value in values if isinstance(value, bytes))
        blob = await client.get(key)
        ttl = await client.pttl(key)
    finally:
        await client.aclose()
    assert isinstance(blob, bytes)
    # Only the key derived from the client secret opens it, and only under its own name.
    entry = json.loads(open_sealed(derive_key(CLIENT_ID, CLIENT_SECRET), key, blob))
    assert entry["value"] == token
    with pytest.raises(InvalidTag):
        open_sealed(derive_key(CLIENT_ID, CLIENT_SECRET + "x"), key, blob)
    with pytest.raises(InvalidTag):
        open_sealed(derive_key(CLIENT_ID, CLIENT_SECRET), key.replace(vat, "DK99999999"), blob)
    # Nothing readable without it: not the token in any encoding, not the secret.
    for encoded in _encodings(token):
        assert encoded not in dump
    assert CLIENT_SECRET.encode() not in dump
    assert CLIENT_ID.encode() not in b"".join(keys)
    # It expires with the token: 3600 s less the expiry margin.
    assert 3000_000 < ttl <= 3570_000


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
    redis_down = False
    answered_while_down: set[int] = set()  # the terminals

    async def terminal(n: int) -> None:
        while loop.time() < deadline:
            status, _, _ = await copies[n % 2].request(
                "GET", f"/pos/v10/payments/{n}", merchant=KEYS[n % 4]
            )
            statuses.append(status)
            if redis_down:
                answered_while_down.add(n)
            await asyncio.sleep(0.01)

    async def outage() -> None:
        nonlocal redis_down
        await asyncio.sleep(1.5)
        await asyncio.to_thread(redis_server.stop)
        redis_down = True
        await asyncio.sleep(2.5)
        redis_down = False
        await asyncio.to_thread(redis_server.start)

    await asyncio.gather(outage(), *(terminal(n) for n in range(20)))
    # Every terminal was answered while Redis was down, and every answer was a 200.
    assert answered_while_down == set(range(20))
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


async def test_rotated_credentials_rekey_the_shared_store(
    start_proxy: Callable[..., Any],
    token_server: TokenServer,
    pos_server: PosServer,
    redis_server: RedisServer,
) -> None:
    proxy: RunningProxy = await start_proxy(tokens={"store": redis_server.url})
    assert (await proxy.request("GET", "/pos/v10/payments/1"))[0] == 200
    accept_rotated_credentials(token_server)
    apply_config(
        proxy.app[STATE],
        reloaded(proxy, mobilepay={"client_id": ROTATED_ID, "client_secret": ROTATED_SECRET}),
    )
    assert (await proxy.request("GET", "/pos/v10/payments/2"))[0] == 200
    # A new token, fetched with the new credentials: nothing from before was adopted.
    assert token_server.count() == 2
    assert pos_server.requests[-1].headers["Authorization"] == f"Bearer {token_server.issued[1]}"
    vat = MERCHANTS["store-001"]
    new_key = f"mobilepay-proxy:{hashlib.sha256(ROTATED_ID.encode()).hexdigest()[:16]}:{vat}"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        blob = await client.get(new_key)
    finally:
        await client.aclose()
    assert isinstance(blob, bytes)
    plain = open_sealed(derive_key(ROTATED_ID, ROTATED_SECRET), new_key, blob)
    assert json.loads(plain)["value"] == token_server.issued[1]
    # The rotated-away secret cannot read what was written after the rotation.
    for client_id in (CLIENT_ID, ROTATED_ID):
        with pytest.raises(InvalidTag):
            open_sealed(derive_key(client_id, CLIENT_SECRET), new_key, blob)


async def test_an_older_token_never_overwrites_a_newer_one(redis_server: RedisServer) -> None:
    config = RedisStoreConfig(url=redis_server.url, lock_seconds=0.5)
    slow, fast = (
        RedisTokenStore(config, CLIENT_ID, CLIENT_SECRET, Metrics(CollectorRegistry()))
        for _ in range(2)
    )
    vat = MERCHANTS["store-001"]
    try:
        # The slow copy's lock expired mid-fetch and the fast one fetched too.
        older, newer = await slow.next_generation(vat), await fast.next_generation(vat)
        expires = time.time() + 3600
        await fast.save(vat, SharedToken("newer-token", newer, expires - 300, expires))
        await slow.save(vat, SharedToken("older-token", older, expires - 300, expires))
        found = await fast.load(vat)
        assert found is not None
        assert (found.value, found.generation) == ("newer-token", newer)
    finally:
        await slow.close()
        await fast.close()


async def test_a_rejected_token_is_not_adopted_again_from_the_store(
    start_proxy: Callable[..., Any],
    token_server: TokenServer,
    pos_server: PosServer,
    redis_server: RedisServer,
) -> None:
    sections = {"tokens": {"store": redis_server.url}}
    first: RunningProxy = await start_proxy(**sections)
    second: RunningProxy = await start_proxy(**sections)
    assert (await first.request("GET", "/pos/v10/payments/1"))[0] == 200
    assert (await second.request("GET", "/pos/v10/payments/2"))[0] == 200
    assert token_server.count() == 1
    rejected = token_server.issued[0]
    pos_server.rejected.add(rejected)

    async def fail_once(request: web.Request) -> web.StreamResponse | None:
        token_server.fault = None
        return web.Response(status=500)

    token_server.fault = fail_once
    # The first copy sees the 401, announces it; its forced refresh fails.
    status, headers, _ = await first.request("GET", "/pos/v10/payments/3")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")
    vat = MERCHANTS["store-001"]
    tokens = second.app[STATE].tokens
    assert tokens is not None
    async with asyncio.timeout(3):
        while tokens.status([vat])[0].valid:  # noqa: ASYNC110 - waits for the announcement
            await asyncio.sleep(0.01)
    assert (await second.request("GET", "/pos/v10/payments/4"))[0] == 200
    sent_rejected = [
        r for r in pos_server.requests if r.headers["Authorization"] == f"Bearer {rejected}"
    ]
    assert len(sent_rejected) == 3, "a copy adopted the rejected token again"
