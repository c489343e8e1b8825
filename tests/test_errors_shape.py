"""The proxy's own errors in MobilePay's shape, and 405s that name each route's methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer
from tests.helpers.rawhttp import RawResponse, request_bytes, send_raw
from tests.pos_spec import error_response_problems

M = ("X-Merchant-Id", "store-001")


def assert_proxy_error(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-proxy-error"] == code
    body = response.json()
    assert error_response_problems(body) == [], body
    assert body["code"] == code
    assert body["correlationId"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (request_bytes("GET", "/pos/v10/payments/1"), 400, "missing_routing_header"),
        (
            request_bytes("GET", "/pos/v10/payments/1", [("X-Merchant-Id", "x" * 99)]),
            400,
            "invalid_routing_header",
        ),
        (request_bytes("GET", "/pos/v10/../x", [M]), 400, "invalid_path"),
        (request_bytes("GET", "/pos/v10/payments?a;b", [M]), 400, "invalid_query"),
        (request_bytes("GET", "http://evil/x", [M]), 400, "absolute_target"),
        (
            request_bytes("GET", "/pos/v10/payments/1", [M, ("Upgrade", "h2c")]),
            400,
            "upgrade_not_supported",
        ),
        (
            request_bytes("GET", "/pos/v10/payments/1", [("X-Merchant-Id", "store-999")]),
            403,
            "unknown_merchant",
        ),
        (request_bytes("GET", "/metrics", [M]), 404, "unknown_route"),
        (request_bytes("PUT", "/pos/v10/payments/1", [M]), 405, "method_not_allowed"),
        (request_bytes("POST", "/pos/v10/payments", [M], b"x" * 2_000_000), 413, "body_too_large"),
        (
            b"GET /pos/v10/payments/1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            b"GET /pos/v10/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
            431,
            "headers_too_large",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_every_refusal_is_an_error_response(
    proxy: RunningProxy, raw: bytes, status: int, code: str
) -> None:
    response = await send_raw(proxy.url, raw)
    proxy.exposure.texts.append(response.body.decode(errors="replace"))
    assert_proxy_error(response, status, code)


async def test_upstream_and_token_failures_are_error_responses(
    start_proxy: Callable[..., Any], token_server: TokenServer
) -> None:
    unreachable: RunningProxy = await start_proxy(mobilepay={"api_base_url": "https://127.0.0.1:9"})
    response = await send_raw(unreachable.url, request_bytes("GET", "/pos/v10/stores/s", [M]))
    assert_proxy_error(response, 502, "upstream_unreachable")

    async def down(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    token_server.fault = down
    proxy: RunningProxy = await start_proxy()
    response = await send_raw(proxy.url, request_bytes("GET", "/pos/v10/stores/s", [M]))
    assert_proxy_error(response, 503, "token_unavailable")
    assert response.headers["retry-after"]


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/pos/v10/payments/p1", "GET"),
        ("DELETE", "/pos/v10/payments/p1", "GET"),
        ("GET", "/pos/v10/payments/prepare", "POST"),
        ("DELETE", "/pos/v10/payments", "GET, POST"),
        ("PUT", "/pos/v10/payments/p1/capture", "POST"),
        ("GET", "/pos/v10/payments/p1/cancel", "POST"),
        ("POST", "/pos/v10/pointofsales/pos1", "DELETE, GET"),
        ("POST", "/pos/v10/pointofsales/pos1/checkin", "GET"),
        ("POST", "/pos/v10/stores", "GET"),
        ("DELETE", "/pos/v10/stores/detailed", "GET"),
        ("POST", "/pos/v10/stores/s1", "GET"),
        ("PATCH", "/pos/v10/refunds", "GET, POST"),
        ("DELETE", "/pos/v10/refunds/r1", "GET"),
        ("GET", "/pos/v10/refunds/r1/capture", "POST"),
        ("TRACE", "/pos/v10/refunds/r1/cancel", "POST"),
        ("OPTIONS", "/pos/v10/payments/p1?x=1", "GET"),
    ],
)
async def test_405_lists_the_methods_of_the_route(
    proxy: RunningProxy,
    pos_server: PosServer,
    token_server: TokenServer,
    method: str,
    target: str,
    allow: str,
) -> None:
    response = await send_raw(proxy.url, request_bytes(method, target, [M]))
    assert_proxy_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow
    assert allow in response.json()["message"]
    assert pos_server.requests == []
    assert token_server.count() == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "TRACE"])
async def test_an_unknown_path_is_404_whatever_the_method(
    proxy: RunningProxy, pos_server: PosServer, method: str
) -> None:
    response = await send_raw(proxy.url, request_bytes(method, "/admin/payments", [M]))
    assert_proxy_error(response, 404, "unknown_route")
    assert "allow" not in response.headers
    assert pos_server.requests == []
