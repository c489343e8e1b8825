"""Every phase towards MobilePay has a deadline with one answer, and a metric that counts it."""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer
from tests.helpers.waiting import eventually
from tests.scripted_upstream import Peer, scripted_upstream

EARLY_400 = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    b'{"code":"1153","message":"bad","c":"1"}\n'
)
OK = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}'


def timeouts(proxy: RunningProxy, phase: str) -> float:
    return proxy.sample("mobilepay_proxy_timeouts_total", {"phase": phase})


def _answers_early_then_stops_reading(peer: Peer) -> None:
    """MobilePay refusing a request from its head alone, never reading the body."""
    peer.read_head()
    peer.send(EARLY_400)
    peer.hold(10)


@pytest.mark.parametrize("size", [12 * 1024 * 1024, 900 * 1000])
async def test_an_early_answer_to_a_large_body_is_relayed_and_its_connection_dropped(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext, size: int
) -> None:
    with scripted_upstream(server_tls, _answers_early_then_stops_reading) as upstream:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url},
            server={"max_body_bytes": size},
            upstream={"timeout_seconds": 3, "send_timeout_seconds": 3},
        )
        async with asyncio.timeout(2.5):  # before any upstream deadline could answer
            status, _, body = await proxy.request(
                "POST", "/pos/v10/payments", data=io.BytesIO(b"x" * size)
            )
        assert (status, body) == (400, EARLY_400.split(b"\r\n\r\n", 1)[1])
        # The upstream never read that body: the next request must not follow it there.
        async with asyncio.timeout(2.5):
            status, _, _ = await proxy.request("POST", "/pos/v10/payments", json={})
        assert status == 400
        assert upstream.connections == 2
        head_on_second = upstream.peers[1].received
        assert b"x" * 16 not in head_on_second
    assert timeouts(proxy, "upstream_send") == 0


async def test_an_upstream_that_reads_nothing_hits_the_send_deadline(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext
) -> None:
    def script(peer: Peer) -> None:
        peer.hold(10)

    with scripted_upstream(server_tls, script) as upstream:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url},
            server={"max_body_bytes": 12 * 1024 * 1024},
            upstream={"timeout_seconds": 5, "send_timeout_seconds": 0.3},
        )
        async with asyncio.timeout(2.5):
            status, headers, _ = await proxy.request(
                "POST", "/pos/v10/payments", data=io.BytesIO(b"x" * (12 * 1024 * 1024))
            )
    assert (status, headers["X-Proxy-Error"]) == (504, "upstream_send_timeout")
    assert timeouts(proxy, "upstream_send") == 1


async def test_a_response_that_does_not_come_hits_the_read_deadline(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext
) -> None:
    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")  # and no more
        peer.hold(10)

    with scripted_upstream(server_tls, script) as upstream:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url}, upstream={"timeout_seconds": 0.3}
        )
        status, headers, _ = await proxy.request("GET", "/pos/v10/payments/p1")
    assert (status, headers["X-Proxy-Error"]) == (504, "upstream_timeout")
    assert timeouts(proxy, "upstream_read") == 1


async def test_a_connect_that_does_not_complete_hits_the_connect_deadline(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext
) -> None:
    # A listener that never accepts: the kernel completes the TCP connect, TLS never starts.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": f"https://127.0.0.1:{port}"},
            upstream={"connect_timeout_seconds": 0.2},
        )
        status, headers, _ = await proxy.request("DELETE", "/pos/v10/pointofsales/x")
    finally:
        silent.close()
    assert (status, headers["X-Proxy-Error"]) == (504, "upstream_connect_timeout")
    assert timeouts(proxy, "upstream_connect") == 1


def _slow_first_answer(peer: Peer) -> None:
    while True:
        peer.read_request()
        peer.hold(1.0)
        peer.send(OK)


@pytest.mark.slow  # waits out deadlines of about a second
async def test_a_request_waiting_for_the_pool_past_its_deadline_is_503(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext
) -> None:
    with scripted_upstream(server_tls, _slow_first_answer) as upstream:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url},
            upstream={"max_connections": 1, "pool_timeout_seconds": 0.2},
        )
        first = asyncio.create_task(proxy.request("GET", "/pos/v10/payments/1"))
        await asyncio.sleep(0.1)  # the first holds the only connection
        status, headers, _ = await proxy.request("GET", "/pos/v10/payments/2")
        assert (status, headers["X-Proxy-Error"]) == (503, "upstream_busy")
        assert headers["Retry-After"] == "1"
        assert (await first)[0] == 200
    assert timeouts(proxy, "pool_wait") == 1
    requests = [peer.received for peer in upstream.peers]
    assert len(upstream.peers) == 1
    assert b"/payments/2" not in requests[0]


@pytest.mark.slow  # waits out deadlines of about a second
async def test_a_queued_request_whose_deadline_passed_is_never_sent(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext, token_server: TokenServer
) -> None:
    sent: list[bytes] = []

    def script(peer: Peer) -> None:
        while True:
            head, _ = peer.read_request()
            sent.append(head.split(b"\r\n", 1)[0])
            if b"/warm " not in head:
                peer.hold(0.8)
            peer.send(OK)

    with scripted_upstream(server_tls, script) as upstream:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url},
            upstream={
                "max_connections": 1,
                "request_deadline_seconds": 1,
                "pool_timeout_seconds": 1,
                "timeout_seconds": 1,
                "connect_timeout_seconds": 0.5,
                "send_timeout_seconds": 0.5,
            },
        )
        assert (await proxy.request("GET", "/pos/v10/payments/warm", merchant="store-001"))[
            0
        ] == 200
        # The late one spends half its second on its token, then queues behind the holder
        # (0.3 s to 1.1 s): its deadline passes in the queue, before the pool timeout would.
        token_server.delay = 0.5
        late = asyncio.create_task(
            proxy.request("GET", "/pos/v10/payments/2", merchant="store-002")
        )
        await asyncio.sleep(0.3)
        holder = await proxy.request("GET", "/pos/v10/payments/1", merchant="store-001")
        status, headers, _ = await late
        assert holder[0] == 200
        assert (status, headers["X-Proxy-Error"]) == (504, "request_deadline_exceeded")
    assert sent == [b"GET /pos/v10/payments/warm HTTP/1.1", b"GET /pos/v10/payments/1 HTTP/1.1"]
    assert timeouts(proxy, "request_deadline") == 1
    assert timeouts(proxy, "pool_wait") == 0


@pytest.mark.slow  # waits out deadlines of about a second
async def test_the_overall_deadline_bounds_the_token_wait(
    start_proxy: Callable[..., Any], token_server: TokenServer
) -> None:
    token_server.delay = 1.0
    proxy: RunningProxy = await start_proxy(
        upstream={
            "request_deadline_seconds": 0.3,
            "timeout_seconds": 0.2,
            "connect_timeout_seconds": 0.2,
            "send_timeout_seconds": 0.2,
            "pool_timeout_seconds": 0.2,
        }
    )
    status, headers, body = await proxy.request("GET", "/pos/v10/payments/1")
    assert (status, headers["X-Proxy-Error"]) == (504, "request_deadline_exceeded")
    assert b"message" in body
    assert timeouts(proxy, "request_deadline") == 1
    # The fetch itself goes on: the next request finds the token.
    await eventually(lambda: len(token_server.issued) == 1, "the token issued")
    status, _, _ = await proxy.request("GET", "/pos/v10/payments/1")
    assert status == 200
    assert token_server.count() == 1


async def test_the_overall_deadline_bounds_the_401_replay(
    start_proxy: Callable[..., Any], token_server: TokenServer, pos_server: PosServer
) -> None:
    async def slow_once_rejected(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(0.25)
        return web.json_response({})

    proxy: RunningProxy = await start_proxy(
        upstream={
            "request_deadline_seconds": 0.4,
            "timeout_seconds": 0.35,
            "connect_timeout_seconds": 0.2,
            "send_timeout_seconds": 0.2,
            "pool_timeout_seconds": 0.2,
        }
    )
    status, _, _ = await proxy.request("GET", "/pos/v10/payments/1")  # a token is held
    assert status == 200
    pos_server.rejected.update(token_server.issued)  # the next call gets 401
    pos_server.handler = slow_once_rejected
    token_server.delay = 0.2
    status, headers, _ = await proxy.request("GET", "/pos/v10/payments/1")
    # 401 at once, 0.2 s for the new token, then 0.25 s upstream: over the 0.4 s deadline.
    assert (status, headers["X-Proxy-Error"]) == (504, "request_deadline_exceeded")
    assert timeouts(proxy, "request_deadline") == 1
