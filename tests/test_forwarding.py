"""The proxy end to end over real sockets: what MobilePay received, what the terminal got."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from aiohttp import web

from tests.conftest import MERCHANTS, RunningProxy
from tests.fakes import IBM_CLIENT_ID, PosServer, TokenServer


async def test_get_is_forwarded_with_injected_credentials(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    status, headers, body = await proxy.request(
        "GET",
        "/pos/v10/payments/3fa85f64?posId=p%201&orderId=o-1",
        headers={"X-MobilePay-Client-System-Version": "1.2.3"},
    )
    assert status == 200, body
    assert headers["X-Upstream"] == "pos"
    assert json.loads(body)["vat"] == MERCHANTS["store-001"]
    (received,) = pos_server.requests
    assert received.method == "GET"
    assert received.path_qs == "/pos/v10/payments/3fa85f64?posId=p%201&orderId=o-1"
    assert received.headers.getall("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert received.headers.getall("x-ibm-client-id") == [IBM_CLIENT_ID]
    assert received.headers.getall("X-MobilePay-Merchant-VAT-Number") == [MERCHANTS["store-001"]]
    assert received.headers["X-MobilePay-Client-System-Version"] == "1.2.3"
    assert received.headers["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Merchant-Id" not in received.headers
    assert received.headers["Host"].startswith("127.0.0.1:")


async def test_post_body_and_idempotency_key_pass_unchanged(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    payload = b'{"amount": 12.5, "posId": "p1", "orderId": "\xc3\xa6\xc3\xb8"}'
    status, _, _ = await proxy.request(
        "POST",
        "/pos/v10/payments",
        data=payload,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "X-MobilePay-Idempotency-Key": "idem-123",
        },
    )
    assert status == 200
    (received,) = pos_server.requests
    assert received.body == payload
    assert received.headers["X-MobilePay-Idempotency-Key"] == "idem-123"
    assert received.headers["Content-Type"] == "application/json; charset=utf-8"
    assert received.headers["Content-Length"] == str(len(payload))


async def test_spoofed_credentials_and_connection_trick(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    status, _, _ = await proxy.request(
        "GET",
        "/pos/v10/stores/s1",
        headers={
            "Authorization": "Bearer forged-token",
            "x-ibm-client-id": "forged-ibm",
            "X-MobilePay-Merchant-VAT-Number": "DK99999999",
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
            "Connection": "Authorization, x-ibm-client-id, X-MobilePay-Merchant-VAT-Number, "
            "X-Merchant-Id, keep-alive",
        },
    )
    assert status == 200
    (received,) = pos_server.requests
    assert received.headers.getall("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert received.headers.getall("x-ibm-client-id") == [IBM_CLIENT_ID]
    assert received.headers.getall("X-MobilePay-Merchant-VAT-Number") == [MERCHANTS["store-001"]]
    assert received.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert received.headers.getall("Forwarded") == ["for=127.0.0.1"]
    assert "X-Merchant-Id" not in received.headers


async def test_each_merchant_gets_its_own_token(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    for key in ("store-001", "store-002", "store-001"):
        status, _, _ = await proxy.request("GET", "/pos/v10/stores/s1", merchant=key)
        assert status == 200
    assert token_server.count() == 2
    for received in pos_server.requests:
        vat = received.headers["X-MobilePay-Merchant-VAT-Number"]
        token = received.headers["Authorization"].removeprefix("Bearer ")
        assert token_server.issued_for[vat] == [token]
    forms = sorted(r.body.decode() for r in token_server.requests)
    assert forms == [
        f"grant_type=client_credentials&merchant_vat={MERCHANTS['store-001']}",
        f"grant_type=client_credentials&merchant_vat={MERCHANTS['store-002']}",
    ]
    sent = token_server.requests[0].headers
    assert sent["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent["Authorization"].startswith("Basic ")
    assert sent["x-ibm-client-id"] == IBM_CLIENT_ID


@pytest.mark.slow
async def test_cold_start_is_single_flight_per_merchant(
    proxy: RunningProxy, token_server: TokenServer
) -> None:
    token_server.delay = 0.3
    keys = list(MERCHANTS)
    results = await asyncio.gather(
        *(
            proxy.request("GET", f"/pos/v10/payments/{i}", merchant=keys[i % 10])
            for i in range(1000)
        )
    )
    assert [status for status, _, _ in results] == [200] * 1000
    assert token_server.count() == 10
    for vat in MERCHANTS.values():
        assert token_server.count(vat) == 1
    assert (
        proxy.sample(
            "mobilepay_proxy_token_refreshes_total", {"reason": "initial", "result": "success"}
        )
        == 10
    )


async def test_401_forces_one_refresh_and_replays_the_same_request(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    await proxy.request("GET", "/pos/v10/stores/s1")
    pos_server.rejected.add(token_server.issued[0])
    pos_server.requests.clear()
    body = b'{"posId": "p1", "amount": 10}'
    status, _, _ = await proxy.request(
        "POST",
        "/pos/v10/payments",
        data=body,
        headers={"X-MobilePay-Idempotency-Key": "k-401", "Content-Type": "application/json"},
    )
    assert status == 200
    first, second = pos_server.requests
    assert first.headers["Authorization"] == f"Bearer {token_server.issued[0]}"
    assert second.headers["Authorization"] == f"Bearer {token_server.issued[1]}"
    assert first.body == second.body == body
    assert first.headers["X-MobilePay-Idempotency-Key"] == "k-401"
    assert second.headers["X-MobilePay-Idempotency-Key"] == "k-401"
    assert (
        proxy.sample(
            "mobilepay_proxy_token_refreshes_total", {"reason": "forced", "result": "success"}
        )
        == 1
    )
    assert proxy.sample("mobilepay_proxy_upstream_401_retries_total", {"result": "success"}) == 1


async def test_second_401_goes_back_to_the_terminal(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    async def always_401(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})

    pos_server.handler = always_401
    status, headers, body = await proxy.request("GET", "/pos/v10/stores/s1")
    assert status == 401
    assert body == b""
    assert headers["WWW-Authenticate"] == "Bearer"
    assert "X-Proxy-Error" not in headers
    assert len(pos_server.requests) == 2
    assert token_server.count() == 2
    assert (
        proxy.sample("mobilepay_proxy_upstream_401_retries_total", {"result": "unauthorized"}) == 1
    )


async def test_a_401_storm_costs_one_forced_fetch(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    await proxy.request("GET", "/pos/v10/stores/s1")
    pos_server.rejected.add(token_server.issued[0])
    token_server.delay = 0.2
    results = await asyncio.gather(
        *(proxy.request("GET", f"/pos/v10/payments/{i}") for i in range(100))
    )
    assert [status for status, _, _ in results] == [200] * 100
    assert token_server.count() == 2


async def test_relays_status_headers_and_raw_body(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    compressed = gzip.compress(b'{"code": "1301", "message": "active payment"}')

    async def conflict(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(
            status=409,
            body=compressed,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "X-Correlation": "c-1",
                "Connection": "X-Correlation-Internal",
                "X-Correlation-Internal": "drop-me",
            },
        )

    pos_server.handler = conflict
    status, headers, body = await proxy.request(
        "POST", "/pos/v10/payments", json={}, headers={"Accept-Encoding": "gzip"}
    )
    assert status == 409
    assert body == compressed
    assert headers["Content-Encoding"] == "gzip"
    assert headers["X-Correlation"] == "c-1"
    assert "X-Correlation-Internal" not in headers


async def test_redirects_are_relayed_not_followed(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    async def redirect(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "https://elsewhere/x"})

    pos_server.handler = redirect
    status, headers, _ = await proxy.request("GET", "/pos/v10/stores/s1")
    assert status == 302
    assert headers["Location"] == "https://elsewhere/x"
    assert len(pos_server.requests) == 1


async def test_metrics_use_route_templates(proxy: RunningProxy) -> None:
    await proxy.request("GET", "/pos/v10/payments/3fa85f64")
    await proxy.request("GET", "/pos/v10/payments/aaaaaaaa")
    await proxy.request("GET", "/pos/v10/payments/x/y/z")
    text = await proxy.metrics()
    assert (
        'mobilepay_proxy_requests_total{method="GET",route="/pos/v10/payments/{paymentid}",'
        'status="200"} 2.0' in text
    )
    assert "3fa85f64" not in text
    assert "x/y/z" not in text
    assert (
        proxy.sample(
            "mobilepay_proxy_request_duration_seconds_count",
            {"method": "GET", "route": "/pos/v10/payments/{paymentid}"},
        )
        == 2
    )
    assert (
        proxy.sample(
            "mobilepay_proxy_upstream_duration_seconds_count",
            {"method": "GET", "route": "/pos/v10/payments/{paymentid}"},
        )
        == 2
    )
    assert proxy.sample("mobilepay_proxy_in_flight_requests") == 0


async def test_health_and_readiness(proxy: RunningProxy) -> None:
    async with proxy.session.get(proxy.metrics_url + "/healthz") as response:
        assert response.status == 200
    async with proxy.session.get(proxy.metrics_url + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"
