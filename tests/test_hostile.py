"""Hostile terminal input: each case has a pinned answer and costs no token or upstream call."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer
from tests.helpers.rawhttp import request_bytes, send_raw

M = ("X-Merchant-Id", "store-001")
GET_PAYMENT = "/pos/v10/payments/1"


def _nothing_sent(pos_server: PosServer, token_server: TokenServer) -> None:
    assert pos_server.requests == []
    assert token_server.count() == 0


@pytest.mark.parametrize(
    ("method", "target", "headers", "status", "code"),
    [
        ("GET", GET_PAYMENT, [], 400, "missing_routing_header"),
        ("GET", GET_PAYMENT, [("X-Merchant-Id", "")], 400, "invalid_routing_header"),
        ("GET", GET_PAYMENT, [M, M], 400, "invalid_routing_header"),
        (
            "GET",
            GET_PAYMENT,
            [("X-Merchant-Id", "store-001, store-002")],
            400,
            "invalid_routing_header",
        ),
        ("GET", GET_PAYMENT, [("X-Merchant-Id", "st\xf8re-001")], 400, "invalid_routing_header"),
        ("GET", GET_PAYMENT, [("X-Merchant-Id", "s" * 200)], 400, "invalid_routing_header"),
        ("GET", GET_PAYMENT, [("X-Merchant-Id", "store-999")], 403, "unknown_merchant"),
        ("GET", "http://evil/pos/v10/payments/1", [M], 400, "absolute_target"),
        ("GET", "http://evil/x", [M], 400, "absolute_target"),
        ("CONNECT", "evil:443", [M], 405, "method_not_allowed"),
        ("OPTIONS", "*", [M], 405, "method_not_allowed"),
        ("TRACE", GET_PAYMENT, [M], 405, "method_not_allowed"),
        ("PUT", GET_PAYMENT, [M], 405, "method_not_allowed"),
        ("FOO", GET_PAYMENT, [M], 405, "method_not_allowed"),
        ("GET", "/pos/v10/../x", [M], 400, "invalid_path"),
        ("GET", "/pos/v10/%2e%2e/x", [M], 400, "invalid_path"),
        ("GET", "/pos/v10/payments%2f..%2f..%2fx", [M], 400, "invalid_path"),
        ("GET", "/pos/v10/%252e%252e/x", [M], 400, "invalid_path"),
        ("GET", "//pos/v10/payments", [M], 400, "invalid_path"),
        ("GET", "/pos/v10//payments", [M], 400, "invalid_path"),
        ("GET", "/pos/v10/payments;a=b", [M], 400, "invalid_path"),
        ("GET", "/pos/v10/payments?a;b", [M], 400, "invalid_query"),
        ("GET", "/pos/v10/payments?a=%g1", [M], 400, "invalid_query"),
        ("GET", "/metrics", [M], 404, "unknown_route"),
        ("GET", "/pos/v10", [M], 404, "unknown_route"),
        ("GET", "/integrator-authentication/connect/token", [M], 404, "unknown_route"),
        (
            "GET",
            GET_PAYMENT,
            [
                M,
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            400,
            "upgrade_not_supported",
        ),
        (
            "GET",
            GET_PAYMENT,
            [
                M,
                ("Upgrade", "h2c"),
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
            ],
            400,
            "upgrade_not_supported",
        ),
    ],
)
async def test_rejected_requests(
    proxy: RunningProxy,
    pos_server: PosServer,
    token_server: TokenServer,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    status: int,
    code: str,
) -> None:
    response = await send_raw(proxy.url, request_bytes(method, target, headers))
    assert response.status == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-proxy-error"] == code
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    if status == 405:
        assert response.headers["allow"]
    _nothing_sent(pos_server, token_server)


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (
            b"POST /pos/v10/payments HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"POST /pos/v10/payments HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
            "malformed_request",
        ),
        (
            b"POST /pos/v10/payments HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b"Transfer-Encoding: xchunked\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b" folded\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\nHost: a\nX-Merchant-Id: store-001\n\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store\x00-001\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b"X-Other: a\x01b\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store\r-001\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nHost: evil\r\n"
            b"X-Merchant-Id: store-001\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/"
            + b"a" * 9000
            + b" HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\nX-Big: "
            + b"a" * 9000
            + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
            + b"\r\n",
            400,
            "malformed_request",
        ),
    ],
)
async def test_requests_the_parser_refuses_get_json_errors(
    proxy: RunningProxy,
    pos_server: PosServer,
    token_server: TokenServer,
    raw: bytes,
    status: int,
    code: str,
) -> None:
    response = await send_raw(proxy.url, raw, expect_close=True)
    assert response.status == status
    assert response.json()["code"] == code
    assert response.headers["x-proxy-error"] == code
    assert response.closed, "the connection stays open after a framing error"
    _nothing_sent(pos_server, token_server)


@pytest.mark.parametrize(
    ("raw", "method", "status", "code"),
    [
        (
            b"FOO /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "OTHER",
            405,
            "method_not_allowed",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nHost: secret-looking-host\r\n\r\n",
            "GET",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            "GET",
            431,
            "headers_too_large",
        ),
        (
            b"POST /pos/v10/payments HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: secret-looking-trailer\r\n\r\n",
            "POST",
            400,
            "malformed_request",
        ),
    ],
    ids=["unknown method", "duplicate Host", "over-long header", "trailer"],
)
async def test_requests_the_parser_refuses_are_counted_and_logged(
    proxy: RunningProxy, raw: bytes, method: str, status: int, code: str
) -> None:
    response = await send_raw(proxy.url, raw, expect_close=True)
    assert (response.status, response.json()["code"]) == (status, code)
    # A refused trailer fails the body of a request the pipeline has routed already.
    route = "/pos/v10/payments" if method == "POST" else "unmatched"
    labels = {"method": method, "route": route, "status": str(status)}
    assert proxy.sample("mobilepay_proxy_requests_total", labels) == 1
    assert proxy.sample("mobilepay_proxy_errors_total", {"code": code}) == 1
    access = [line for line in proxy.exposure.logs.lines if " proxy.access " in line]
    assert len(access) == 1
    assert f" {method} " in access[0]
    assert f"-> {status}" in access[0]
    # Nothing of the refused bytes is logged.
    assert not any("secret-looking" in line or "aaaa" in line for line in proxy.exposure.logs.lines)


async def test_host_header_never_steers_the_request(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    raw = request_bytes("GET", GET_PAYMENT, [M]).replace(b"Host: proxy", b"Host: evil.example")
    response = await send_raw(proxy.url, raw)
    assert response.status == 200
    (received,) = pos_server.requests
    assert received.headers["Host"].startswith("127.0.0.1:")


async def test_body_over_the_limit_is_413_before_anything_is_sent(
    start_proxy: Callable[..., Any], pos_server: PosServer, token_server: TokenServer
) -> None:
    proxy: RunningProxy = await start_proxy(server={"max_body_bytes": 1000})
    status, _, body = await proxy.request("POST", "/pos/v10/payments", data=b"x" * 1001)
    assert (status, json.loads(body)["code"]) == (413, "body_too_large")

    async def chunks() -> Any:
        for _ in range(20):
            yield b"y" * 100

    status, _, body = await proxy.request("POST", "/pos/v10/payments", data=chunks())
    assert (status, json.loads(body)["code"]) == (413, "body_too_large")
    status, _, _ = await proxy.request("POST", "/pos/v10/payments", data=b"x" * 1000)
    assert status == 200
    assert len(pos_server.requests) == 1
    assert token_server.count() == 1


async def test_an_unframed_http10_body_is_400_before_anything_is_sent(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    # Neither Content-Length nor chunked: a request body can never run until the connection
    # closes (RFC 9112 6.3), and HTTP/1.0 asks a POST for a Content-Length (RFC 1945 8.3).
    raw = b"POST /pos/v10/payments HTTP/1.0\r\nX-Merchant-Id: store-001\r\n\r\n" + b"z" * 5000
    response = await send_raw(proxy.url, raw, expect_close=True)
    assert (response.status, response.json()["code"]) == (400, "malformed_request")
    assert response.closed
    _nothing_sent(pos_server, token_server)


async def test_trickling_body_hits_the_deadline_and_others_are_unaffected(
    start_proxy: Callable[..., Any], pos_server: PosServer
) -> None:
    proxy: RunningProxy = await start_proxy(server={"body_timeout_seconds": 0.5})
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: a\r\nX-Merchant-Id: store-001\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    head = b""
    # A byte every 0.1 s for 4 s: a timeout that each byte restarted would never expire.
    for _ in range(40):
        with contextlib.suppress(ConnectionError):
            writer.write(b"x")
            await writer.drain()
        status, _, _ = await proxy.request("GET", GET_PAYMENT, merchant="store-002")
        assert status == 200
        with contextlib.suppress(TimeoutError):
            head = await asyncio.wait_for(reader.readuntil(b"}"), 0.1)
            break
    assert head.startswith(b"HTTP/1.1 408"), "the trickle kept the body deadline away"
    assert b"request_timeout" in head
    assert loop.time() - started > 0.45
    writer.close()
    assert all(r.method == "GET" for r in pos_server.requests)
    assert proxy.sample("mobilepay_proxy_timeouts_total", {"phase": "request_body"}) == 1


async def test_source_networks_restrict_a_merchant(
    start_proxy: Callable[..., Any], pos_server: PosServer, token_server: TokenServer
) -> None:
    proxy: RunningProxy = await start_proxy(
        routing={
            "merchants": {
                "store-a": {"vat": "DK10000001", "networks": ["127.0.0.0/8"]},
                "store-b": {"vat": "DK10000002", "networks": ["10.20.0.0/16", "::1/128"]},
            }
        }
    )
    assert (await proxy.request("GET", GET_PAYMENT, merchant="store-a"))[0] == 200
    status, headers, _ = await proxy.request("GET", GET_PAYMENT, merchant="store-b")
    assert (status, headers["X-Proxy-Error"]) == (403, "source_not_allowed")
    assert len(pos_server.requests) == 1
    assert token_server.count() == 1


async def test_slowloris_headers_are_cut_off_and_others_are_unaffected(
    start_proxy: Callable[..., Any], pos_server: PosServer
) -> None:
    proxy: RunningProxy = await start_proxy(server={"header_timeout_seconds": 0.5})
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\n")
    closed_at = None
    for i in range(30):
        try:
            writer.write(b"X-Slow-%d: 1\r\n" % i)
            await writer.drain()
        except ConnectionError:
            pass
        status, _, _ = await proxy.request("GET", GET_PAYMENT, merchant="store-002")
        assert status == 200
        try:
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed_at = loop.time()
                break
        except TimeoutError:
            pass
        except ConnectionError:
            closed_at = loop.time()
            break
    writer.close()
    assert closed_at is not None, "a trickling client kept its connection"
    # Cut off while still trickling, not before the header timeout, and counted as such.
    assert closed_at - started > 0.45
    assert proxy.sample("mobilepay_proxy_timeouts_total", {"phase": "request_head"}) == 1
    assert all(
        r.headers["X-MobilePay-Merchant-VAT-Number"] == "DK10000002" for r in pos_server.requests
    )
