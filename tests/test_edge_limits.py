"""The terminal edge's bounds, seen from raw sockets: what one terminal can make it hold.

Pipelined requests are parsed only as far as the queue has room, a terminal that stops
reading its answers is cut off at the send deadline, and connections beyond
``max_connections`` are refused. Memory is measured as the process's RSS, around
conditions polled for, never around sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psutil
import pytest
from aiohttp import web

from tests.conftest import Exposure, RunningProxy
from tests.fakes import PosServer
from tests.helpers.rawhttp import request_bytes

M = ("X-Merchant-Id", "store-001")
MIB = 1024 * 1024
TIMEOUTS = "mobilepay_proxy_timeouts_total"
CONNECTIONS = "mobilepay_proxy_terminal_connections"


def get(path: str, *headers: tuple[str, str]) -> bytes:
    return request_bytes("GET", path, [M, *headers])


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def rss() -> int:
    """The process's resident memory, after the C allocator returned what it keeps free."""
    libc = ctypes.CDLL(None)
    # glibc keeps large freed blocks for reuse once its mmap threshold has grown past them;
    # a fixed threshold gives each large buffer its own mapping, returned when freed, so
    # RSS shows what is still held rather than what the allocator keeps.
    libc.mallopt(M_MMAP_THRESHOLD, MIB)
    libc.malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


async def until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll until ``condition()`` holds; fail if it does not within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


Open = Callable[[RunningProxy], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def open_connection() -> AsyncIterator[Open]:
    writers: list[asyncio.StreamWriter] = []

    async def open_one(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        return reader, writer

    yield open_one
    for writer in writers:
        writer.transport.abort()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a terminal that is switched off mid-conversation does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_pipelined_requests_are_parsed_only_as_far_as_the_queue_has_room(
    proxy: RunningProxy, pos_server: PosServer, open_connection: Open
) -> None:
    release = asyncio.Event()
    held: list[str] = []

    async def hold_the_first(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.raw_path.endswith("/held"):
            held.append(request.raw_path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"path": request.raw_path})

    pos_server.handler = hold_the_first
    await proxy.request("GET", "/pos/v10/payments/warm-up")
    before = rss()
    # Ten terminals each send a request MobilePay sits on, then 1 MiB of short requests.
    pipelined = get("/pos/v10/payments/held") + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * (MIB // 26)
    writers = []
    for _ in range(10):
        _, writer = await open_connection(proxy)
        writer.write(pipelined)
        writers.append(writer)
    await until(lambda: len(held) == 10)
    # Whatever the proxy read of each connection, it parsed no more than its queue holds.
    grown = rss() - before
    release.set()
    for writer in writers:
        reset(writer)
    assert grown < 15 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"


async def test_answers_stop_when_the_terminal_resets_the_connection(
    proxy: RunningProxy, exposure: Exposure, open_connection: Open
) -> None:
    refused = request_bytes("GET", "/pos/v10/payments/1", [("X-Merchant-Id", "store-999")])
    reader, writer = await open_connection(proxy)
    # Answers that need no call to MobilePay, pipelined, and the terminal leaves after one.
    writer.write(refused * 5000)
    await reader.readuntil(b"unknown_merchant")
    reset(writer)

    def forbidden() -> float:
        return proxy.sample(
            "mobilepay_proxy_requests_total",
            {"method": "GET", "route": "/pos/v10/payments/{paymentid}", "status": "403"},
        )

    await until(lambda: proxy.sample(CONNECTIONS) == 0 and forbidden() > 0)
    answered = forbidden()
    for _ in range(20):  # event loop turns in which a stray answer would show
        await asyncio.sleep(0)
    assert forbidden() == answered, "requests are still answered for a terminal that left"
    writes_after_close = [line for line in exposure.logs.lines if "socket.send()" in line]
    assert writes_after_close == []
    assert (await proxy.request("GET", "/pos/v10/payments/2"))[0] == 200


@pytest.mark.slow
async def test_terminals_that_stop_reading_are_cut_off_and_their_memory_freed(
    start_proxy: Callable[..., Any],
    pos_server: PosServer,
    open_connection: Open,
    exposure: Exposure,
) -> None:
    proxy: RunningProxy = await start_proxy(server={"send_timeout_seconds": 2})
    large = b"x" * (8 * MIB)

    async def large_answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(body=large, content_type="application/octet-stream")

    def answered() -> int:
        return sum("/pos/v10/payments/1 -> 200" in line for line in exposure.logs.lines)

    pos_server.handler = large_answer
    await proxy.request("GET", "/pos/v10/payments/warm-up")
    kept_alive = proxy.sample(CONNECTIONS)
    for _ in range(10):
        _, writer = await open_connection(proxy)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(get("/pos/v10/payments/1"))
    # Nobody reads: each answer waits in the proxy's buffers, until the send deadline.
    await until(lambda: answered() == 10)
    held = rss()
    await until(lambda: proxy.sample(TIMEOUTS, {"phase": "response_send"}) == 10, within=20)
    await until(lambda: proxy.sample(CONNECTIONS) == kept_alive)
    freed = held - rss()
    assert freed > 60 * MIB, f"only {freed / MIB:.0f} MiB of 80 MiB of answers freed"
    assert (await proxy.request("GET", "/pos/v10/payments/2"))[0] == 200


async def test_connections_beyond_max_connections_are_refused_and_counted(
    start_proxy: Callable[..., Any], open_connection: Open
) -> None:
    proxy: RunningProxy = await start_proxy(server={"max_connections": 2})
    kept = []
    for n in range(2):
        reader, writer = await open_connection(proxy)
        writer.write(get(f"/pos/v10/payments/{n}"))
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        kept.append((reader, writer))
    assert proxy.sample(CONNECTIONS) == 2

    reader, writer = await open_connection(proxy)
    writer.write(get("/pos/v10/payments/3"))
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"\r\nConnection: close" in head
    assert b"\r\nX-Proxy-Error: too_many_connections" in head
    assert b'"code": "too_many_connections"' in body
    assert proxy.sample("mobilepay_proxy_connections_refused_total") == 1
    assert proxy.sample("mobilepay_proxy_errors_total", {"code": "too_many_connections"}) == 1

    kept[0][1].transport.abort()
    await until(lambda: proxy.sample(CONNECTIONS) == 1)
    reader, writer = await open_connection(proxy)
    writer.write(get("/pos/v10/payments/4"))
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
