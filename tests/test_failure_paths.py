"""The paths taken when something goes wrong rarely: each one over the wire, as documented.

A merchants file with every kind of row and mistake, an upstream certificate from an
unknown CA, a drain that runs out of time, a request handler that raises, a 401 whose
forced refresh fails, an undecryptable token in Redis, and new credentials on SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis

from proxy.config import ConfigError, parse_config
from proxy.edge import EdgeServer
from proxy.errors import ProxyError
from proxy.messages import Reply, Request, error_reply
from proxy.metrics import Metrics
from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer, held_until, start_tls_server
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.exposure import Exposure
from tests.helpers.processes import Processes
from tests.helpers.rawhttp import Connection, request_bytes
from tests.helpers.waiting import eventually
from tests.redis_server import RedisServer

Start = Callable[..., Any]
RETRIES = "mobilepay_proxy_upstream_401_retries_total"


def _merchants_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merchants.csv"
    path.write_text(text, encoding="utf-8")
    return path


async def test_a_merchants_file_routes_its_rows(
    start_proxy: Start, pos_server: PosServer, tmp_path: Path
) -> None:
    csv = _merchants_file(
        tmp_path,
        "key, vat ,networks\n"
        "# shops in Aarhus\n"
        "shop-a,DK20000001,\n"
        "\n"
        "shop-b , DK20000002 ,10.0.0.0/8 192.168.0.0/16\n"
        '"shop-c",FI20000003,127.0.0.0/8\n',
    )
    proxy: RunningProxy = await start_proxy(
        routing={"merchants": {"store-001": "DK10000001"}, "merchants_file": str(csv)}
    )
    assert len(proxy.config.routing.merchants) == 4
    for key, vat in (("shop-a", "DK20000001"), ("shop-c", "FI20000003"), ("store-001", None)):
        status, _, _ = await proxy.request("GET", "/pos/v10/stores/s1", merchant=key)
        assert status == 200
        if vat is not None:
            assert pos_server.requests[-1].headers["X-MobilePay-Merchant-VAT-Number"] == vat
    # Its networks hold: this terminal (127.0.0.1) is outside them.
    status, headers, _ = await proxy.request("GET", "/pos/v10/stores/s1", merchant="shop-b")
    assert (status, headers["X-Proxy-Error"]) == (403, "source_not_allowed")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vat,key\nshop-a,DK20000001\n", "merchants.csv: the first line must be the header"),
        ("", "merchants.csv: the first line must be the header key,vat[,networks]"),
        ("key,vat\nshop-a,DK20000001,10.0.0.0/8\n", "merchants.csv:2: expected key,vat"),
        ("key,vat,networks\nshop-a\n", "merchants.csv:2: expected key,vat,networks"),
        (
            "key,vat\nshop-a,DK20000001\n#\nshop-a,DK20000002\n",
            "merchants.csv:4: merchant key 'shop-a' is defined twice",
        ),
        ("key,vat\nstore-001,DK20000001\n", "merchant key 'store-001' is defined twice"),
        ("key,vat\nshop-a,DK123\n", "merchants.csv:2"),
        ("key,vat,networks\nshop-a,DK20000001,10.0.0.0/33\n", "'10.0.0.0/33' is not a network"),
    ],
)
def test_a_merchants_file_mistake_names_the_file_and_line(
    tmp_path: Path, ca_file: Path, text: str, expected: str
) -> None:
    csv = _merchants_file(tmp_path, text)
    data = proxy_config(
        "https://127.0.0.1:1/t",
        "https://127.0.0.1:1",
        ca_file,
        routing={"merchants": {"store-001": "DK10000001"}, "merchants_file": csv.name},
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(data, base_dir=tmp_path, environ={})
    assert expected in str(raised.value)


def test_an_unreadable_merchants_file_is_a_config_error(tmp_path: Path, ca_file: Path) -> None:
    data = proxy_config(
        "https://127.0.0.1:1/t",
        "https://127.0.0.1:1",
        ca_file,
        routing={"merchants": {}, "merchants_file": "absent.csv"},
    )
    with pytest.raises(ConfigError, match=r"\[routing\] merchants_file: cannot read .*absent"):
        parse_config(data, base_dir=tmp_path, environ={})


async def test_an_upstream_certificate_from_an_unknown_ca_is_502(
    start_proxy: Start, pos_server: PosServer
) -> None:
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(stranger)
    runner, port = await start_tls_server(pos_server.handle, stranger)
    try:
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": f"https://127.0.0.1:{port}"}
        )
        status, headers, body = await proxy.request("GET", "/pos/v10/stores/s1")
    finally:
        await runner.cleanup()
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_unreachable")
    assert "certificate could not be verified" in body.decode()
    assert pos_server.requests == [], "nothing may be sent over an unverified connection"


async def test_the_drain_timeout_aborts_what_is_still_in_flight(
    start_proxy: Start, pos_server: PosServer, exposure: Exposure
) -> None:
    release = asyncio.Event()

    pos_server.handler = held_until(release)
    proxy: RunningProxy = await start_proxy(server={"drain_timeout_seconds": 0.2})
    terminal = await Connection.open(proxy.url, exposure)
    await terminal.send(
        request_bytes("GET", "/pos/v10/stores/s1", [("X-Merchant-Id", "store-001")])
    )
    await eventually(lambda: len(pos_server.requests) == 1, "the request upstream")
    loop = asyncio.get_running_loop()
    stopping = loop.time()
    await proxy.stop()
    assert loop.time() - stopping >= 0.2
    # Cut off without an answer once the drain timeout is over.
    assert await terminal.closes(wait=1)
    await terminal.close()
    release.set()
    assert any(
        "drain timeout: closing 1 connection(s) with requests still in flight" in line
        for line in exposure.logs.lines
    )


async def test_an_exception_in_the_handler_is_a_json_500_and_the_server_lives_on(
    ca_file: Path, exposure: Exposure
) -> None:
    class Raising:
        async def handle(self, request: Request) -> Reply:
            if request.target == "/raise":
                raise RuntimeError("a bug")
            return Reply(200, headers=CIMultiDict({"Content-Type": "text/plain"}), body=b"fine")

        def refuse(self, error: ProxyError, remote: str | None, method: str | None) -> Reply:
            return error_reply(error)

    server = parse_config(
        proxy_config("https://127.0.0.1:1/t", "https://127.0.0.1:1", ca_file),
        base_dir=Path("."),
        environ={},
    ).server
    edge = EdgeServer(Raising(), server, Metrics(CollectorRegistry()))
    await edge.listen("127.0.0.1", 0)
    url = "http://{}:{}".format(*edge.addresses[0][:2])
    try:
        broken = await Connection.open(url, exposure)
        await broken.send(request_bytes("GET", "/raise"))
        answer = await broken.response()
        assert (answer.status, answer.json()["code"]) == (500, "internal_error")
        assert answer.header("X-Proxy-Error") == "internal_error"
        assert answer.json()["message"]
        assert await broken.closes()
        await broken.close()
        fine = await Connection.open(url, exposure)
        await fine.send(request_bytes("GET", "/fine"))
        assert (await fine.response()).body == b"fine"
        await fine.close()
    finally:
        await edge.close(1)
    assert any("error handling a request from" in line for line in exposure.logs.lines)
    assert any("RuntimeError: a bug" in line for line in exposure.logs.lines)


async def test_a_401_whose_forced_refresh_fails_is_503_and_counted(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    assert (await proxy.request("GET", "/pos/v10/stores/s1"))[0] == 200
    pos_server.rejected.update(token_server.issued)

    async def down(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    token_server.fault = down
    status, headers, _ = await proxy.request("GET", "/pos/v10/stores/s1")
    assert (status, headers["X-Proxy-Error"]) == (503, "token_unavailable")
    assert token_server.count() == 2, "one forced refresh, no more"
    assert proxy.sample(RETRIES, {"result": "error"}) == 1
    assert proxy.sample(RETRIES, {"result": "success"}) == 0


async def test_an_undecryptable_token_in_redis_is_ignored_and_replaced(
    start_proxy: Start, token_server: TokenServer, redis_server: RedisServer, exposure: Exposure
) -> None:
    first: RunningProxy = await start_proxy(tokens={"store": redis_server.url})
    assert (await first.request("GET", "/pos/v10/stores/s1"))[0] == 200
    await first.stop()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        # The token's key, as the store lays them out: <prefix>:<client>:<vat>.
        keys = [key async for key in client.scan_iter("mobilepay-proxy:*:DK10000001")]
        assert len(keys) == 1
        ttl = await client.pttl(keys[0])
        await client.set(keys[0], b"\x00" * 12 + b"written with another secret", px=ttl)
    finally:
        await client.aclose()

    second: RunningProxy = await start_proxy(tokens={"store": redis_server.url})
    assert (await second.request("GET", "/pos/v10/stores/s1"))[0] == 200
    assert token_server.count("DK10000001") == 2
    assert any(
        "ignoring an undecryptable token for merchant DK10000001 in Redis" in line
        for line in exposure.logs.lines
    )


@pytest.mark.slow
async def test_sighup_with_new_credentials_drops_every_token(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    processes: Processes,
) -> None:
    def write(token_url: str, upstream_timeout: float) -> Path:
        data = proxy_config(
            token_url, pos_server.url, ca_file, upstream={"timeout_seconds": upstream_timeout}
        )
        return write_config(tmp_path / "proxy.toml", data)

    proxy = await processes.start_proxy(write(token_server.url, 5))
    keys = ("store-001", "store-002")
    async with aiohttp.ClientSession() as session:

        async def call(key: str) -> int:
            async with session.get(
                f"{proxy.url}/pos/v10/stores/s1", headers={"X-Merchant-Id": key}
            ) as response:
                await response.read()
                return response.status

        assert [await call(key) for key in keys] == [200, 200]
        assert token_server.count() == 2
        # Another token endpoint: the tokens held were issued under other credentials.
        write(token_server.url + "-rotated", 4)
        proxy.running.signal(signal.SIGHUP)
        await proxy.running.line(re.compile("reloaded .*proxy.toml"))
        assert [await call(key) for key in keys] == [200, 200]
    assert token_server.count() == 4
    assert [r.path_qs for r in token_server.requests[2:]] == [
        "/integrator-authentication/connect/token-rotated"
    ] * 2
    fresh = {r.headers["Authorization"] for r in pos_server.requests[2:]}
    assert fresh == {f"Bearer {token}" for token in token_server.issued[2:]}
    assert "changed settings that take effect only after a restart: upstream" in (
        proxy.running.output
    )


async def test_sighup_without_a_file_keeps_the_configuration(
    proxy: RunningProxy, exposure: Exposure
) -> None:
    # serve() in this process, from a configuration given as data: nothing to re-read.
    os.kill(os.getpid(), signal.SIGHUP)
    message = "reload requested, but the configuration did not come from a file"
    await eventually(lambda: any(message in line for line in exposure.logs.lines), message)
    assert (await proxy.request("GET", "/pos/v10/stores/s1"))[0] == 200
