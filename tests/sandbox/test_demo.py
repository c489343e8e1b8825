"""The demo against the simulator, through a stand-in for the proxy.

The stand-in does what the proxy does in the smallest way: it maps the
routing header to a merchant VAT, fetches a token and adds the credential
headers. It records what the demo sent, so the tests can check that the
terminal side carries no credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.sandbox import demo

from .conftest import IBM_CLIENT_ID, VAT, SandboxClient

METRICS = """\
# HELP mobilepay_proxy_requests_total Requests.
# TYPE mobilepay_proxy_requests_total counter
mobilepay_proxy_requests_total{merchant="demo-store-1",status="200"} 14.0
mobilepay_proxy_token_refreshes_total{merchant="demo-store-1"} 1.0
mobilepay_proxy_request_duration_seconds_count{merchant="demo-store-1"} 14.0
mobilepay_proxy_request_duration_seconds_sum{merchant="demo-store-1"} 0.42
unrelated_total 3.0
"""
FORWARDED = frozenset(
    {"content-type", "x-mobilepay-client-system-version", "x-mobilepay-idempotency-key"}
)


class StandIn:
    def __init__(self, client: SandboxClient) -> None:
        self.client = client
        self.received: list[CIMultiDict[str]] = []

    async def forward(self, request: web.Request) -> web.Response:
        self.received.append(CIMultiDict(request.headers))
        if request.headers.get("X-Merchant-Id") != "demo-store-1":
            return web.Response(status=400, text="unknown merchant")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        headers["Authorization"] = f"Bearer {await self.client.token(VAT)}"
        headers["X-IBM-Client-Id"] = IBM_CLIENT_ID
        url = self.client.url.with_path(request.path).with_query(request.query)
        async with self.client.session.request(
            request.method, url, headers=headers, data=await request.read()
        ) as answer:
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                content_type=answer.content_type if answer.content_length else None,
            )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=METRICS)


@pytest.fixture
async def stand_in(client: SandboxClient) -> AsyncIterator[tuple[StandIn, URL]]:
    stand_in = StandIn(client)
    app = web.Application()
    app.router.add_get("/metrics", stand_in.metrics)
    app.router.add_route("*", "/{tail:.*}", stand_in.forward)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield stand_in, URL.build(scheme="http", host="127.0.0.1", port=runner.addresses[0][1])
    finally:
        await runner.cleanup()


def argv(client: SandboxClient, proxy: URL, tls_dir: Path) -> list[str]:
    return [
        f"--proxy={proxy}",
        f"--sandbox={client.url}",
        f"--ca-file={tls_dir / 'ca.pem'}",
        f"--metrics={proxy.with_path('/metrics')}",
        "--min-poll-interval=0",
    ]


async def test_demo_runs_a_payment_through_the_proxy(
    client: SandboxClient,
    stand_in: tuple[StandIn, URL],
    tls_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    forwarder, proxy = stand_in
    options = demo.options_from_args(demo.build_parser().parse_args(argv(client, proxy, tls_dir)))
    await demo.run_demo(options)

    out = capsys.readouterr().out
    for step in (
        "list stores",
        "look up store",
        "create point of sale",
        "initiate payment",
        "user checks in",
        "poll until IssuedToUser",
        "user accepts",
        "status=Reserved",
        "capture payment",
        "create refund",
        "capture refund",
        "status=Captured",
        "delete point of sale",
        'mobilepay_proxy_token_refreshes_total{merchant="demo-store-1"} 1.0',
        "mobilepay_proxy_request_duration_seconds_sum",
    ):
        assert step in out, step
    assert "unrelated_total" not in out

    credential_headers = {"authorization", "x-ibm-client-id", "x-mobilepay-merchant-vat-number"}
    assert forwarder.received
    for headers in forwarder.received:
        assert not credential_headers & {name.lower() for name in headers}
        if "X-Merchant-Id" in headers:
            assert headers["X-MobilePay-Client-System-Version"] == "1.0.0"
    stats = await client.admin("GET", "/stats")
    assert stats["user_simulation_requests"] == 2
    assert stats["pos_requests"]["by_status"] == {"200": stats["pos_requests"]["total"]}
    token = await client.token()
    store_id = await client.first_store(token)
    pos_ids = await client.pos("GET", "/pointofsales", token, params={"storeId": store_id})
    assert pos_ids.json == {"posIds": []}, "the demo deletes its point of sale"


async def test_demo_fails_clearly(
    client: SandboxClient,
    stand_in: tuple[StandIn, URL],
    tls_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, proxy = stand_in
    await client.admin("POST", "/faults", {"unauthorized_next": 100})
    # main() runs its own event loop, so it cannot run on this test's loop.
    code = await asyncio.to_thread(demo.main, argv(client, proxy, tls_dir))
    assert code == 1
    captured = capsys.readouterr()
    assert "demo failed: list stores: the proxy answered 401" in captured.err
