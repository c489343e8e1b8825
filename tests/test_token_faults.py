"""Token endpoint failures: 503 with Retry-After, backoff, and valid tokens keep serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.tokens.token import usable_lifetime
from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer, make_jwt
from tests.helpers.ports import refusing_port


def _fault(response: Callable[[], web.StreamResponse]) -> Any:
    async def fault(request: web.Request) -> web.StreamResponse:
        return response()

    return fault


FAULTS = {
    "500": lambda: web.Response(status=500, text="boom"),
    "503": lambda: web.Response(status=503, headers={"Retry-After": "7"}),
    "garbage": lambda: web.Response(status=200, text="{not json", content_type="application/json"),
    "no_token": lambda: web.json_response({"expires_in": 3600, "token_type": "Bearer"}),
    "expires_zero": lambda: web.json_response({"access_token": "opaque", "expires_in": 0}),
    "expires_negative": lambda: web.json_response({"access_token": "opaque", "expires_in": -5}),
    "expires_missing": lambda: web.json_response({"access_token": "opaque"}),
    "expires_text": lambda: web.json_response({"access_token": "opaque", "expires_in": "soon"}),
    "invalid_client": lambda: web.json_response({"error": "invalid_client"}, status=401),
    "invalid_grant": lambda: web.json_response({"error": "invalid_grant"}, status=400),
    "array": lambda: web.json_response([1, 2]),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_no_token_means_503_with_retry_after_and_no_upstream_call(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer, fault: str
) -> None:
    token_server.fault = _fault(FAULTS[fault])
    status, headers, body = await proxy.request("GET", "/pos/v10/stores/s1")
    assert status == 503
    assert headers["X-Proxy-Error"] == "token_unavailable"
    assert json.loads(body)["code"] == "token_unavailable"
    assert int(headers["Retry-After"]) >= 1
    if fault == "503":
        assert int(headers["Retry-After"]) == 7
    assert pos_server.requests == []
    # Backing off: an immediate second request does not call the token endpoint again.
    status, _, _ = await proxy.request("GET", "/pos/v10/stores/s1")
    assert status == 503
    assert token_server.count() == 1
    assert (
        proxy.sample(
            "mobilepay_proxy_token_refreshes_total", {"reason": "initial", "result": "failure"}
        )
        == 1
    )


async def test_invalid_client_is_logged_as_a_credentials_problem(
    proxy: RunningProxy, token_server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    token_server.fault = _fault(FAULTS["invalid_client"])
    await proxy.request("GET", "/pos/v10/stores/s1")
    assert any("client_secret" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_token_endpoint_timeout_and_refused(
    start_proxy: Callable[..., Any], token_server: TokenServer
) -> None:
    token_server.delay = 2
    proxy: RunningProxy = await start_proxy(tokens={"timeout_seconds": 0.3})
    status, headers, _ = await proxy.request("GET", "/pos/v10/stores/s1")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")

    with refusing_port() as port:
        refused: RunningProxy = await start_proxy(
            mobilepay={"token_url": f"https://127.0.0.1:{port}/token"}
        )
        status, headers, _ = await refused.request("GET", "/pos/v10/stores/s1")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")


async def test_untrusted_token_endpoint_certificate_is_refused(
    start_proxy: Callable[..., Any], token_server: TokenServer, tmp_path: Any
) -> None:
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    proxy: RunningProxy = await start_proxy(mobilepay={"ca_file": str(other_ca)})
    status, headers, _ = await proxy.request("GET", "/pos/v10/stores/s1")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")
    assert token_server.count() == 0  # the TLS handshake failed before any request


@pytest.mark.slow
async def test_backoff_under_load_during_an_outage(
    start_proxy: Callable[..., Any], token_server: TokenServer
) -> None:
    token_server.fault = _fault(FAULTS["500"])
    proxy: RunningProxy = await start_proxy(
        tokens={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    # Batches of 20 during which no fetch was attempted, and those during which one was.
    without_fetch = with_fetch = 0
    while loop.time() < deadline:
        attempts = token_server.count()
        results = await asyncio.gather(
            *(proxy.request("GET", "/pos/v10/stores/s1") for _ in range(20))
        )
        assert {status for status, _, _ in results} == {503}
        if token_server.count() == attempts:
            without_fetch += 1
        else:
            with_fetch += 1
        await asyncio.sleep(0.02)
    # Doubling from 0.1-0.2 s up to a 0.5-1 s cap: a handful of attempts in 3 s, not one per
    # batch, and requests between attempts are refused at once rather than kept waiting.
    assert 3 <= token_server.count() <= 12
    assert without_fetch > with_fetch


@pytest.mark.parametrize(
    ("expires_in", "jwt_lifetime", "expected"),
    [
        (3700, 3600, 3600.0),
        (3700, None, 3700.0),
        (None, 3600, 3600.0),
        (10**9, None, 86400.0),
        (0, None, None),
        (-1, None, None),
        (None, None, None),
        ("3600", None, None),
        (True, None, None),
    ],
)
def test_usable_lifetime_trusts_the_earlier(
    expires_in: object, jwt_lifetime: int | None, expected: float | None
) -> None:
    value = make_jwt("DK12345678", jwt_lifetime, 1) if jwt_lifetime is not None else "opaque"
    assert usable_lifetime(expires_in, value) == expected
