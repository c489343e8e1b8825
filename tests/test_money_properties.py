"""Property: whatever resets, 401s, reloads and Redis failures happen, no POST without an
idempotency key reaches MobilePay twice, and every terminal request gets exactly one answer.

Everything is real: a raw TLS upstream told per request what to do on each attempt, the
fake token endpoint, a real Redis behind a TCP relay the test can cut, and reloads applied
to the running proxy as SIGHUP applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import STATE, apply_config
from tests.conftest import RunningProxy
from tests.fakes import CLIENT_ID, CLIENT_SECRET, TokenServer
from tests.helpers.rawhttp import RawResponse, request_bytes, send_raw
from tests.redis_server import RedisServer
from tests.test_money_safety import (
    ROTATED_ID,
    ROTATED_SECRET,
    accept_rotated_credentials,
    reloaded,
)

PLAN_HEADER = "X-Test-Plan"
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n"


@dataclass
class PlannedUpstream:
    """A PoS upstream over raw TLS that does, per request and attempt, what the test says.

    A request names its plan (``X-Test-Plan: <id>``); attempt n gets ``plans[id][n]``:
    ``reset`` (the connection dies before any response byte), ``401`` or ``ok`` (the
    default once the plan runs out).
    """

    plans: dict[str, list[str]] = field(default_factory=dict)
    # Per plan id: (method, whether an idempotency key was received) of each attempt.
    received: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                await reader.readexactly(int(headers.get("content-length", "0")))
                plan_id = headers.get(PLAN_HEADER.lower(), "-")
                attempts = self.received.setdefault(plan_id, [])
                attempts.append((lines[0].split(" ")[0], "x-mobilepay-idempotency-key" in headers))
                plan = self.plans.get(plan_id, [])
                action = plan[len(attempts) - 1] if len(attempts) <= len(plan) else "ok"
                if action == "reset":
                    writer.transport.abort()
                    return
                writer.write(UNAUTHORIZED if action == "401" else OK)
                await writer.drain()
        writer.close()


class RedisRelay:
    """A TCP relay in front of Redis that can be cut (connections reset, new ones refused)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self._port
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        finally:
            self._writers -= {writer, upstream_writer}

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.up = True


@pytest.fixture
async def planned_upstream(server_tls: ssl.SSLContext) -> AsyncIterator[PlannedUpstream]:
    upstream = PlannedUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=server_tls)
    upstream.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


@pytest.fixture
async def redis_relay(redis_server: RedisServer) -> AsyncIterator[RedisRelay]:
    relay = RedisRelay(redis_server.port)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    relay.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    yield relay
    relay.cut()
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


# What a terminal sends: (method, path, headers beyond routing and plan).
REQUESTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "get": ("GET", "/pos/v10/payments/{id}", []),
    "keyed_post": ("POST", "/pos/v10/payments", [("X-MobilePay-Idempotency-Key", "{id}")]),
    "unkeyed_post": ("POST", "/pos/v10/payments/{id}/capture", []),
    "stripped_key_post": (
        "POST",
        "/pos/v10/payments/{id}/capture",
        [
            ("X-MobilePay-Idempotency-Key", "{id}"),
            ("Connection", "close, X-MobilePay-Idempotency-Key"),
        ],
    ),
    "underscore_key_post": (
        "POST",
        "/pos/v10/refunds",
        [("X_MobilePay_Idempotency_Key", "{id}")],
    ),
    "delete": ("DELETE", "/pos/v10/pointofsales/{id}", []),
}
attempt_actions = st.lists(st.sampled_from(["reset", "401", "ok"]), max_size=4)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.sampled_from(sorted(REQUESTS)), attempt_actions),
        st.tuples(st.just("reload"), st.sampled_from(["rotate", "same"]), st.just([])),
        st.tuples(st.just("redis"), st.sampled_from(["cut", "restore"]), st.just([])),
        st.tuples(st.just("pause"), st.just(""), st.just([])),
    ),
    min_size=1,
    max_size=8,
)
ids = itertools.count(1)


async def _one_answer(proxy: RunningProxy, kind: str, plan_id: str) -> RawResponse:
    method, path, extra = REQUESTS[kind]
    headers = [(name, value.format(id=plan_id)) for name, value in extra]
    headers += [("X-Merchant-Id", "store-001"), (PLAN_HEADER, plan_id)]
    if not any(name == "Connection" for name, _ in headers):
        headers.append(("Connection", "close"))
    body = b'{"amount": 1}' if method == "POST" else b""
    data = request_bytes(method, path.format(id=plan_id), headers, body)
    # The proxy closes after its answer: anything after the first response would show.
    return await send_raw(proxy.url, data, wait=8.0, expect_close=True)


@dataclass
class Rig:
    proxy: RunningProxy
    sections: dict[str, Any]
    upstream: PlannedUpstream
    relay: RedisRelay
    credentials: int = 0  # which of CREDENTIALS is in force


@pytest.fixture
async def rig(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    planned_upstream: PlannedUpstream,
    token_server: TokenServer,
    redis_relay: RedisRelay,
) -> Rig:
    sections: dict[str, Any] = {
        "mobilepay": {"api_base_url": planned_upstream.url},
        "upstream": {"timeout_seconds": 2},
        "tokens": {
            "store": redis_relay.url,
            "redis_timeout_seconds": 0.1,
            "redis_lock_seconds": 1.5,
            "timeout_seconds": 0.5,
            "unauthorized_cooldown_seconds": 0.2,
        },
    }
    proxy = await start_proxy(**sections)
    accept_rotated_credentials(token_server)
    token_server.delay = 0.02  # so that reloads land while fetches are in flight
    return Rig(proxy, sections, planned_upstream, redis_relay)


CREDENTIALS = [(CLIENT_ID, CLIENT_SECRET), (ROTATED_ID, ROTATED_SECRET)]


# One proxy for every example: what earlier sequences left behind (tokens, backoff,
# cool-downs, a re-keyed store) is part of the state the property must hold in. About 8 s.
@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sequence=steps)
async def test_no_unkeyed_post_twice_and_one_answer_per_request(
    rig: Rig, sequence: list[tuple[str, str, list[str]]]
) -> None:
    proxy, planned_upstream, redis_relay = rig.proxy, rig.upstream, rig.relay
    sent: dict[str, str] = {}
    pending: list[asyncio.Task[RawResponse]] = []
    for action, what, plan in sequence:
        if action == "request":
            plan_id = f"p{next(ids)}"
            planned_upstream.plans[plan_id] = plan
            sent[plan_id] = what
            pending.append(asyncio.create_task(_one_answer(proxy, what, plan_id)))
        elif action == "reload":
            if what == "rotate":
                rig.credentials = 1 - rig.credentials
            client_id, secret = CREDENTIALS[rig.credentials]
            apply_config(
                proxy.app[STATE],
                reloaded(
                    proxy,
                    **{
                        **rig.sections,
                        "mobilepay": {
                            **rig.sections["mobilepay"],
                            "client_id": client_id,
                            "client_secret": secret,
                        },
                    },
                ),
            )
        elif action == "redis":
            redis_relay.cut() if what == "cut" else redis_relay.restore()
        await asyncio.sleep(0.005 if action == "pause" else 0)
    answers = await asyncio.gather(*pending)
    redis_relay.restore()
    for plan_id, answer in zip(sent, answers, strict=True):
        assert answer.closed, "more than one answer, or the connection was kept"
        if answer.status not in (200, 401):
            assert answer.headers["x-proxy-error"] == answer.json()["code"]
        proxy.exposure.texts.append(answer.body.decode(errors="replace"))
        attempts = planned_upstream.received.get(plan_id, [])
        if REQUESTS[sent[plan_id]][0] != "POST" or any(key for _, key in attempts):
            continue
        # A POST without a key: MobilePay may act on each attempt it did not refuse with
        # 401 (a reset one included). At most one such, and at most the one 401 replay.
        plan = planned_upstream.plans[plan_id]
        actions = [plan[n] if n < len(plan) else "ok" for n in range(len(attempts))]
        assert len(attempts) <= 2, (sent[plan_id], actions)
        assert sum(1 for a in actions if a != "401") <= 1, (sent[plan_id], actions)
