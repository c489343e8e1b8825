"""MobilePay misbehaving (refused, reset, slow, bad framing); resends that cannot double-charge."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import RunningProxy
from tests.fakes import TokenServer
from tests.helpers.ports import refusing_port

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


@dataclass
class FaultServer:
    """A TLS server speaking raw bytes, so it can break HTTP in ways no framework allows."""

    behaviour: str = "ok"
    failures_left: int = 0
    received: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if self.behaviour == "read_late":
                    await asyncio.sleep(0.5)
                body = await reader.readexactly(length)
                self.received.append(head + body)
                behaviour = self.behaviour if self.failures_left != 0 else "ok"
                self.failures_left -= 1
                if behaviour in ("ok", "read_late"):
                    writer.write(OK)
                    await writer.drain()
                    continue
                if behaviour == "close_after_answering":
                    writer.write(OK)
                    await writer.drain()
                if behaviour == "reset":
                    writer.transport.abort()
                elif behaviour == "mid_body":
                    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":')
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.transport.abort()
                elif behaviour == "slow":
                    await asyncio.sleep(3)
                    writer.write(OK)
                elif behaviour == "cl_te":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\n0\r\n\r\n"
                    )
                    await writer.drain()
                elif behaviour == "connection_listed":
                    body = b'{"ok":true}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
                        b"Keep-Alive: timeout=5\r\nX-End: 2\r\nContent-Length: 11\r\n\r\n" + body
                    )
                    await writer.drain()
                    continue
                return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def fault_server(server_tls: ssl.SSLContext) -> AsyncIterator[FaultServer]:
    fault = FaultServer()
    server = await asyncio.start_server(fault.handle, "127.0.0.1", 0, ssl=server_tls)
    fault.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield fault
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


@pytest.fixture
async def faulty_proxy(start_proxy: Callable[..., Any], fault_server: FaultServer) -> RunningProxy:
    proxy: RunningProxy = await start_proxy(
        mobilepay={"api_base_url": fault_server.url}, upstream={"timeout_seconds": 1}
    )
    return proxy


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        ("reset", 502, "upstream_unreachable"),
        ("mid_body", 502, "upstream_bad_response"),
        ("slow", 504, "upstream_timeout"),
        ("cl_te", 502, "upstream_bad_response"),
    ],
)
async def test_upstream_faults_map_to_gateway_errors(
    faulty_proxy: RunningProxy, fault_server: FaultServer, behaviour: str, status: int, code: str
) -> None:
    fault_server.behaviour, fault_server.failures_left = behaviour, -1
    got, headers, body = await faulty_proxy.request(
        "POST", "/pos/v10/payments/p1/capture", json={"amount": 1}
    )
    assert (got, headers["X-Proxy-Error"]) == (status, code)
    assert b"partial" not in body
    assert len(fault_server.received) == 1, "a non-idempotent request was sent twice"


async def test_refused_and_unresolvable_upstreams(start_proxy: Callable[..., Any]) -> None:
    with refusing_port() as port:
        refused: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": f"https://127.0.0.1:{port}"}
        )
        status, headers, _ = await refused.request("GET", "/pos/v10/payments/1")
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_unreachable")
    # .invalid never resolves (RFC 6761): the resolver says so at once.
    unresolvable: RunningProxy = await start_proxy(
        mobilepay={"api_base_url": "https://mobilepay.invalid"},
        upstream={"connect_timeout_seconds": 3},
    )
    status, headers, _ = await unresolvable.request("GET", "/pos/v10/payments/1")
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_unreachable")


async def test_connection_listed_response_headers_are_stripped(
    faulty_proxy: RunningProxy, fault_server: FaultServer
) -> None:
    fault_server.behaviour, fault_server.failures_left = "connection_listed", -1
    status, headers, body = await faulty_proxy.request("GET", "/pos/v10/payments/1")
    assert (status, body) == (200, b'{"ok":true}')
    assert headers["X-End"] == "2"
    assert "X-Secret-Hop" not in headers
    assert "Keep-Alive" not in headers


@pytest.mark.parametrize(
    ("method", "headers", "sent", "status"),
    [
        ("GET", {}, 2, 200),
        ("POST", {"X-MobilePay-Idempotency-Key": "k-1"}, 2, 200),
        ("POST", {}, 1, 502),
        ("POST", {"X-MobilePay-Idempotency-Key": ""}, 1, 502),
        ("DELETE", {}, 1, 502),
    ],
)
async def test_reset_before_headers_is_retried_only_when_safe(
    faulty_proxy: RunningProxy,
    fault_server: FaultServer,
    method: str,
    headers: dict[str, str],
    sent: int,
    status: int,
) -> None:
    fault_server.behaviour, fault_server.failures_left = "reset", 1
    path = "/pos/v10/pointofsales/p1" if method == "DELETE" else "/pos/v10/payments"
    got, _, _ = await faulty_proxy.request(method, path, data=b'{"amount": 5}', headers=headers)
    assert got == status
    assert len(fault_server.received) == sent
    if sent == 2:
        first, second = fault_server.received
        assert first.split(b"\r\n", 1)[0] == second.split(b"\r\n", 1)[0]
        assert first.endswith(b'{"amount": 5}')
        assert second.endswith(b'{"amount": 5}')
        if method == "POST":
            assert b"X-MobilePay-Idempotency-Key: k-1" in second
    assert faulty_proxy.sample("mobilepay_proxy_upstream_retries_total", {"method": method}) == (
        1 if sent == 2 else 0
    )


async def test_a_retry_never_happens_after_response_bytes(
    faulty_proxy: RunningProxy, fault_server: FaultServer, token_server: TokenServer
) -> None:
    fault_server.behaviour, fault_server.failures_left = "mid_body", 1
    status, _, _ = await faulty_proxy.request("GET", "/pos/v10/payments/1")
    assert status == 502
    assert len(fault_server.received) == 1


# Far more than the socket buffers hold: the proxy must wait for room and go on sending.
LARGE_BODY = b"x" * (8 * 1024 * 1024)


async def _large_body_proxy(
    start_proxy: Callable[..., Any], fault_server: FaultServer, timeout_seconds: float
) -> RunningProxy:
    proxy: RunningProxy = await start_proxy(
        mobilepay={"api_base_url": fault_server.url},
        server={"max_body_bytes": len(LARGE_BODY)},
        upstream={"timeout_seconds": timeout_seconds},
    )
    return proxy


async def test_a_large_body_reaches_an_upstream_that_reads_it_late(
    start_proxy: Callable[..., Any], fault_server: FaultServer
) -> None:
    proxy = await _large_body_proxy(start_proxy, fault_server, timeout_seconds=10)
    fault_server.behaviour = "read_late"
    status, _, _ = await proxy.request("POST", "/pos/v10/payments", data=io.BytesIO(LARGE_BODY))
    assert status == 200
    (received,) = fault_server.received
    assert received.endswith(b"\r\n\r\n" + LARGE_BODY)


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    faulty_proxy: RunningProxy, fault_server: FaultServer
) -> None:
    fault_server.behaviour, fault_server.failures_left = "close_after_answering", -1
    for _ in range(3):
        status, _, body = await faulty_proxy.request("POST", "/pos/v10/payments", json={})
        assert (status, body) == (200, b'{"ok":true}')
        await asyncio.sleep(0.1)  # the close reaches the proxy while the connection is idle
    assert len(fault_server.received) == 3, "a POST was sent on a dead connection and resent"
