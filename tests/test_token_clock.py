"""Token lifetimes on the token manager's own clock, against the fake endpoint over TLS.

The manager takes its clock as an argument, so these tests move time on instead of waiting
for it: the refresh point and the expiry are the manager's own figures, read from the token
it holds. Fetches are real HTTPS requests to the fake token endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.tokens.fetcher import TokenFetcher
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import MemoryTokenStore
from proxy.upstream import create_session
from tests.fakes import PosServer, TokenServer
from tests.helpers.configs import proxy_config
from tests.helpers.waiting import eventually

VAT = "DK10000001"
REFRESHES = "mobilepay_proxy_token_refreshes_total"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Managed:
    manager: TokenManager
    clock: Clock
    registry: CollectorRegistry

    def refreshes(self, result: str) -> float:
        labels = {"reason": "expiring", "result": result}
        return self.registry.get_sample_value(REFRESHES, labels) or 0.0


@pytest.fixture
async def managed(
    token_server: TokenServer, pos_server: PosServer, ca_file: Path
) -> AsyncIterator[Managed]:
    config = parse_config(
        proxy_config(
            token_server.url, pos_server.url, ca_file, tokens={"backoff_initial_seconds": 0.5}
        ),
        base_dir=Path("."),
        environ={},
    )
    clock = Clock()
    registry = CollectorRegistry()
    async with create_session(config.mobilepay, config.upstream) as session:
        manager = TokenManager(
            TokenFetcher(session, config.mobilepay, 5.0),
            MemoryTokenStore(),
            config.tokens,
            Metrics(registry),
            clock=clock,
        )
        try:
            yield Managed(manager, clock, registry)
        finally:
            await manager.close()


async def test_a_token_is_refreshed_ahead_of_expiry_without_making_anyone_wait(
    managed: Managed, token_server: TokenServer
) -> None:
    manager, clock = managed.manager, managed.clock
    first = await manager.get(VAT)
    assert first.refresh_at < first.expires_at
    clock.now = first.refresh_at - 0.01
    assert (await manager.get(VAT)).value == first.value
    assert token_server.count() == 1, "refreshed before its time"

    # Past the refresh point, a slow token endpoint: the held token is handed out at once
    # (its replacement has not even been issued when get() returns), and the fetch goes on.
    token_server.delay = 0.5
    clock.now = first.refresh_at + 0.01
    assert (await manager.get(VAT)).value == first.value
    assert len(token_server.issued) == 1
    await eventually(lambda: len(token_server.issued) == 2, "the background refresh")
    await eventually(lambda: managed.refreshes("success") == 1, "the refresh counted")
    assert (await manager.get(VAT)).value == token_server.issued[1]
    assert token_server.count() == 2


async def test_a_held_token_keeps_serving_while_refreshes_fail(
    managed: Managed, token_server: TokenServer
) -> None:
    manager, clock = managed.manager, managed.clock
    first = await manager.get(VAT)

    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    token_server.fault = failing
    clock.now = first.refresh_at + 0.01
    assert (await manager.get(VAT)).value == first.value
    await eventually(lambda: managed.refreshes("failure") == 1, "the failed refresh")
    # Twenty requests over the next second, up to just before expiry: every one gets the
    # held token, and the backoff (0.5 s, doubling) allows a few attempts, not twenty.
    step = min(0.05, (first.expires_at - clock.now) / 21)
    for _ in range(20):
        clock.now += step
        assert (await manager.get(VAT)).value == first.value
        # Let an attempt this started reach the endpoint and fail before time moves on.
        await asyncio.sleep(0.01)
        await eventually(
            lambda: managed.refreshes("failure") == token_server.count() - 1, "attempts ended"
        )
    assert 2 <= token_server.count() <= 5


async def test_the_time_a_token_response_takes_is_not_counted_as_its_life(
    managed: Managed, token_server: TokenServer
) -> None:
    manager, clock = managed.manager, managed.clock
    asked_at = clock.now
    quick = await manager.get(VAT)

    async def slow(request: web.Request) -> None:
        clock.now += 20  # the endpoint takes 20 s to answer

    token_server.fault = slow
    asked_at_slowly = clock.now
    slow_token = await manager.get("DK10000002")
    # The issuer's lifetime starts no earlier than the request: the 20 s are not extra life.
    assert slow_token.expires_at - asked_at_slowly == quick.expires_at - asked_at
    assert slow_token.refresh_at - asked_at_slowly == quick.refresh_at - asked_at
