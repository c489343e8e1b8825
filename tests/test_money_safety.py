"""Money safety over real sockets: resends, reloads mid-fetch, 401 storms, hostile numbers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import STATE, apply_config
from proxy.config import Config, parse_config
from proxy.errors import TokenUnavailable
from proxy.metrics import Metrics
from proxy.tokens.fetcher import TokenFetcher
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import MemoryTokenStore
from proxy.upstream import create_session
from tests.conftest import MERCHANTS, RunningProxy
from tests.fakes import PosServer, TokenServer, make_jwt
from tests.helpers.configs import proxy_config
from tests.test_upstream_faults import FaultServer, fault_server

__all__ = ["fault_server"]  # a fixture, used by name

ROTATED_ID = "rotated-client-id"
ROTATED_SECRET = "rotated-client-secret-Pw3x"


def accept_rotated_credentials(
    token_server: TokenServer, client_id: str = ROTATED_ID, secret: str = ROTATED_SECRET
) -> None:
    """Make the fake token endpoint also issue tokens for a second set of credentials."""
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()

    async def rotated(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Authorization") != f"Basic {basic}":
            return None
        form = await request.post()
        vat = str(form.get("merchant_vat", ""))
        token = make_jwt(vat, token_server.lifetime, len(token_server.issued) + 1)
        token_server.issued.append(token)
        token_server.issued_for.setdefault(vat, []).append(token)
        return web.json_response(
            {"access_token": token, "expires_in": token_server.lifetime, "token_type": "Bearer"}
        )

    token_server.fault = rotated


def reloaded(proxy: RunningProxy, **sections: Any) -> Config:
    """The running proxy's configuration with some sections changed, as a reload reads it."""
    mobilepay = proxy.config.mobilepay
    data = proxy_config(
        str(mobilepay.token_url), str(mobilepay.api_base_url), Path(str(mobilepay.ca_file))
    )
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, base_dir=Path("."), environ={})


async def until(condition: Callable[[], bool]) -> None:
    """Poll for a condition the test cannot await directly (within the test's timeout)."""
    async with asyncio.timeout(3):
        while not condition():  # noqa: ASYNC110 - the condition is on another server's state
            await asyncio.sleep(0.01)


# 1. Resend decisions are made on what was sent.


@pytest.mark.parametrize(
    "headers",
    [
        {"X-MobilePay-Idempotency-Key": "key-123", "Connection": "X-MobilePay-Idempotency-Key"},
        {"X_MobilePay_Idempotency_Key": "key-123"},
    ],
)
async def test_a_key_that_was_not_sent_does_not_make_a_post_resendable(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    fault_server: FaultServer,
    headers: dict[str, str],
) -> None:
    proxy = await start_proxy(
        mobilepay={"api_base_url": fault_server.url}, upstream={"timeout_seconds": 1}
    )
    fault_server.behaviour, fault_server.failures_left = "reset", 1
    status, reply, _ = await proxy.request(
        "POST", "/pos/v10/payments/p1/capture", data=b'{"amount": 5}', headers=headers
    )
    assert (status, reply["X-Proxy-Error"]) == (502, "upstream_unreachable")
    (sent,) = fault_server.received
    assert b"idempotency" not in sent.lower()
    assert proxy.sample("mobilepay_proxy_upstream_retries_total", {"method": "POST"}) == 0


# 2. Every request gets an answer, whatever is cancelled under it.


async def test_credentials_rotated_mid_fetch_retry_once_with_the_new_ones(
    proxy: RunningProxy, token_server: TokenServer, pos_server: PosServer
) -> None:
    token_server.delay = 0.5
    pending = asyncio.create_task(proxy.request("GET", "/pos/v10/payments/1"))
    await until(lambda: token_server.count() == 1)
    accept_rotated_credentials(token_server)
    apply_config(
        proxy.app[STATE],
        reloaded(proxy, mobilepay={"client_id": ROTATED_ID, "client_secret": ROTATED_SECRET}),
    )
    token_server.delay = 0
    status, _, _ = await asyncio.wait_for(pending, 3)
    assert status == 200
    (received,) = pos_server.requests
    # The token fetched with the rotated-away credentials was never used.
    assert received.headers["Authorization"] == f"Bearer {token_server.issued[-1]}"
    assert token_server.requests[-1].headers["Authorization"] == (
        "Basic " + base64.b64encode(f"{ROTATED_ID}:{ROTATED_SECRET}".encode()).decode()
    )


async def test_a_merchant_removed_mid_fetch_gets_503_token_unavailable(
    proxy: RunningProxy, token_server: TokenServer, pos_server: PosServer
) -> None:
    token_server.delay = 0.5
    pending = asyncio.create_task(proxy.request("GET", "/pos/v10/payments/1"))
    await until(lambda: token_server.count() == 1)
    others = {key: vat for key, vat in MERCHANTS.items() if key != "store-001"}
    apply_config(proxy.app[STATE], reloaded(proxy, routing={"merchants": others}))
    status, headers, body = await asyncio.wait_for(pending, 3)
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["code"] == "token_unavailable"
    assert pos_server.requests == []


async def test_shutdown_mid_fetch_answers_the_waiting_requests(
    proxy: RunningProxy, token_server: TokenServer
) -> None:
    token_server.delay = 0.5
    pending = [
        asyncio.create_task(proxy.request("GET", f"/pos/v10/payments/{n}")) for n in range(3)
    ]
    await until(lambda: token_server.count() == 1)
    tokens = proxy.app[STATE].tokens
    assert tokens is not None
    await tokens.close()
    for task in pending:
        status, headers, _ = await asyncio.wait_for(task, 3)
        assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")


# 3. The backoff does not overflow.


@pytest.mark.slow  # about 2 s
async def test_backoff_survives_thousands_of_consecutive_failures(
    token_server: TokenServer, pos_server: PosServer, ca_file: Path
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    token_server.fault = failing
    config = parse_config(
        proxy_config(token_server.url, pos_server.url, ca_file),
        base_dir=Path("."),
        environ={},
    )
    now = [1000.0]
    async with create_session(config.mobilepay, config.upstream) as session:
        manager = TokenManager(
            TokenFetcher(session, config.mobilepay, 2.0),
            MemoryTokenStore(),
            config.tokens,
            Metrics(CollectorRegistry()),
            clock=lambda: now[0],
        )
        for _ in range(1100):
            with pytest.raises(TokenUnavailable) as refused:
                await manager.get("DK10000001")
            assert 1 <= (refused.value.retry_after or 0) <= config.tokens.backoff_max_seconds
            now[0] += 10 * config.tokens.backoff_max_seconds
        await manager.close()
    assert token_server.count() == 1100


# 4. Token responses are read whole.


@pytest.fixture
async def split_token_server(
    server_tls: ssl.SSLContext, token_server: TokenServer
) -> AsyncIterator[str]:
    """A token endpoint writing its JSON body in two TLS records, a pause between them."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            form = (await reader.readexactly(length)).decode()
            vat = form.rpartition("merchant_vat=")[2]
            token = make_jwt(vat, 3600, len(token_server.issued) + 1)
            token_server.issued.append(token)
            token_server.issued_for.setdefault(vat, []).append(token)
            body = json.dumps(
                {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            )
            writer.write(body[:40])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(body[40:])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}/integrator-authentication/connect/token"
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


async def test_a_token_body_in_two_tls_records_is_read_whole(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    split_token_server: str,
    pos_server: PosServer,
) -> None:
    proxy = await start_proxy(mobilepay={"token_url": split_token_server})
    status, _, body = await proxy.request("GET", "/pos/v10/payments/1")
    assert status == 200, body
    assert len(pos_server.requests) == 1


# 5. A 401 storm does not cost a token fetch per request.


async def test_a_fresh_token_rejected_too_starts_a_cooldown_without_fetches(
    proxy: RunningProxy,
    pos_server: PosServer,
    token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def always_401(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})

    pos_server.handler = always_401
    for n in range(20):
        status, headers, _ = await proxy.request("GET", f"/pos/v10/payments/{n}")
        assert status == 401
        assert "X-Proxy-Error" not in headers
    assert token_server.count() == 2
    assert len(pos_server.requests) == 21
    assert (
        proxy.sample("mobilepay_proxy_upstream_401_retries_total", {"result": "unauthorized"}) == 1
    )
    assert proxy.sample("mobilepay_proxy_upstream_401_retries_total", {"result": "cooldown"}) == 19
    cooling = [r for r in caplog.records if "cool-down" in r.getMessage()]
    assert len(cooling) == 1


async def test_after_the_cooldown_one_forced_refresh_is_tried_again(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    pos_server: PosServer,
    token_server: TokenServer,
) -> None:
    proxy = await start_proxy(tokens={"unauthorized_cooldown_seconds": 0.3})

    async def always_401(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=401)

    pos_server.handler = always_401
    assert (await proxy.request("GET", "/pos/v10/payments/1"))[0] == 401
    assert (await proxy.request("GET", "/pos/v10/payments/2"))[0] == 401
    assert token_server.count() == 2
    await asyncio.sleep(0.35)
    # Cool-down over: the next 401 forces one refresh again, then cools down again.
    assert (await proxy.request("GET", "/pos/v10/payments/3"))[0] == 401
    assert (await proxy.request("GET", "/pos/v10/payments/4"))[0] == 401
    assert token_server.count() == 3
    assert len(pos_server.requests) == 6
    retries = "mobilepay_proxy_upstream_401_retries_total"
    assert proxy.sample(retries, {"result": "unauthorized"}) == 2
    assert proxy.sample(retries, {"result": "cooldown"}) == 2


# 9. Nothing an unauthenticated request sends grows state.


@pytest.mark.slow  # about 2 s
async def test_unauthenticated_requests_with_long_targets_leave_no_state(
    proxy: RunningProxy,
) -> None:
    async def burst(count: int, tag: str) -> None:
        for n in range(count):
            target = f"/pos/v10/{tag}{n:05d}" + "a" * 8000
            status, _, _ = await proxy.request("GET", target, merchant=None)
            assert status == 400

    # yarl and aiohttp keep the last 128 URLs they parsed (their caches are bounded by
    # count): warm those up first, so that only what the proxy itself keeps is measured.
    tracemalloc.start()
    try:
        await burst(300, "warm")
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        await burst(300, "x")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 300 targets of 8 KB kept with their URLs would be 4.8 MB; what the test itself keeps
    # (every log record, for the secrets guard) is about 0.5 MB.
    assert grown < 1_500_000, f"{grown} bytes kept after 300 refused requests"


# 10. Underscore twins of owned headers never reach MobilePay.


async def test_header_names_with_underscores_are_dropped(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    status, _, _ = await proxy.request(
        "GET",
        "/pos/v10/payments/1",
        headers={
            "X_MobilePay_Merchant_VAT_Number": "DK99999999",
            "x_ibm_client_id": "forged",
            "X_Forwarded_For": "6.6.6.6",
            "X_Merchant_Id": "store-002",
            "X-Keep": "1",
        },
    )
    assert status == 200
    (received,) = pos_server.requests
    assert not [name for name in received.headers if "_" in name]
    assert received.headers["X-Keep"] == "1"
    assert received.headers.getall("X-MobilePay-Merchant-VAT-Number") == [MERCHANTS["store-001"]]


# 11. The proxy's own error header means the proxy's own answer.


async def test_an_upstream_x_proxy_error_is_not_relayed(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    async def pretends(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(
            {"code": "2000"}, status=503, headers={"X-Proxy-Error": "token_unavailable"}
        )

    pos_server.handler = pretends
    status, headers, body = await proxy.request("GET", "/pos/v10/payments/1")
    assert status == 503
    assert json.loads(body) == {"code": "2000"}
    assert "X-Proxy-Error" not in headers


# 12. Hostile numbers from the token endpoint are malformed, not errors.


async def test_a_non_ascii_retry_after_is_ignored(
    proxy: RunningProxy, token_server: TokenServer
) -> None:
    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": "²"})

    token_server.fault = unavailable
    status, headers, _ = await proxy.request("GET", "/pos/v10/payments/1")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")
    assert 1 <= int(headers["Retry-After"]) <= 60


@pytest.mark.parametrize(
    "exp", [10**400, float("inf"), float("nan")], ids=["10**400", "inf", "nan"]
)
async def test_an_absurd_jwt_exp_is_ignored(
    proxy: RunningProxy, token_server: TokenServer, pos_server: PosServer, exp: float
) -> None:
    async def absurd(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        vat = str(form["merchant_vat"])
        claims = {"iat": int(time.time()), "exp": exp, "merchant_vat": vat}

        def part(data: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

        token = f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"
        token_server.issued.append(token)
        token_server.issued_for.setdefault(vat, []).append(token)
        return web.json_response({"access_token": token, "expires_in": 600})

    token_server.fault = absurd
    status, _, body = await proxy.request("GET", "/pos/v10/payments/1")
    assert status == 200, body
    async with proxy.session.get(proxy.metrics_url + "/readyz") as response:
        entries = (await response.json())["tokens"]
    (held,) = [entry for entry in entries if entry["valid"]]
    assert 500 < held["expires_in_seconds"] <= 600


@pytest.fixture
async def superscript_length_upstream(server_tls: ssl.SSLContext) -> AsyncIterator[str]:
    """A PoS upstream answering with ``Content-Length: ²`` (a digit to str.isdigit)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


async def test_a_non_ascii_content_length_from_mobilepay_is_a_bad_response(
    start_proxy: Callable[..., Awaitable[RunningProxy]], superscript_length_upstream: str
) -> None:
    proxy = await start_proxy(mobilepay={"api_base_url": superscript_length_upstream})
    status, headers, _ = await proxy.request("GET", "/pos/v10/payments/1")
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_bad_response")


async def test_a_passing_refusal_of_an_accepted_token_starts_no_cooldown(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    refusals = [0]

    async def refuse_twice_then_answer(request: web.Request, body: bytes) -> web.StreamResponse:
        # The second and third calls are refused (the first token, then its replacement).
        refusals[0] += 1
        if refusals[0] in (2, 3):
            return web.Response(status=401)
        return web.json_response({"ok": True})

    pos_server.handler = refuse_twice_then_answer
    assert (await proxy.request("GET", "/pos/v10/payments/1"))[0] == 200
    assert (await proxy.request("GET", "/pos/v10/payments/2"))[0] == 401
    # The replacement was refused once but is accepted now: that ends the cool-down ...
    assert (await proxy.request("GET", "/pos/v10/payments/3"))[0] == 200
    pos_server.handler = None
    pos_server.rejected.add(token_server.issued[1])
    # ... so its next refusal forces a refresh instead of being relayed.
    assert (await proxy.request("GET", "/pos/v10/payments/4"))[0] == 200
    assert token_server.count() == 3
    retries = "mobilepay_proxy_upstream_401_retries_total"
    assert proxy.sample(retries, {"result": "cooldown"}) == 0
