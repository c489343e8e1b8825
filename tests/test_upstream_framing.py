"""How MobilePay's response is framed, ended and held, byte by byte over real TLS."""

from __future__ import annotations

import ssl
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.app import STATE
from tests.conftest import RunningProxy
from tests.scripted_upstream import Peer, scripted_upstream

PARTIAL = b'{"paymentId":"p1","status":"Res'


def _close_delimited(ending: str) -> Callable[[Peer], None]:
    """A response with neither Content-Length nor chunked framing: its end is the close."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + PARTIAL)
        if ending == "close_notify":
            peer.close_notify()
        elif ending == "fin":
            peer.ragged_close()
        else:
            peer.hold(0.2)  # the proxy has read the bytes before the RST arrives
            peer.reset()

    return script


@pytest.mark.parametrize("ending", ["rst", "fin"])
async def test_a_close_delimited_response_cut_without_close_notify_is_502(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext, ending: str
) -> None:
    with scripted_upstream(server_tls, _close_delimited(ending)) as upstream:
        proxy: RunningProxy = await start_proxy(mobilepay={"api_base_url": upstream.url})
        status, headers, body = await proxy.request("GET", "/pos/v10/payments/p1")
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_bad_response")
    assert PARTIAL not in body


async def test_a_close_delimited_response_ended_by_close_notify_is_relayed_whole(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext
) -> None:
    with scripted_upstream(server_tls, _close_delimited("close_notify")) as upstream:
        proxy: RunningProxy = await start_proxy(mobilepay={"api_base_url": upstream.url})
        status, headers, body = await proxy.request("GET", "/pos/v10/payments/p1")
        status_again, _, _ = await proxy.request("GET", "/pos/v10/payments/p1")
    assert (status, body, headers["Content-Length"]) == (200, PARTIAL, str(len(PARTIAL)))
    assert status_again == 200
    assert upstream.connections == 2, "a connection that ended its response was reused"


@pytest.mark.parametrize(
    "length",
    [
        b"\xb2",  # superscript two in latin-1: str.isdigit() says yes, int() says no
        b"\xc2\xb2",  # the same in UTF-8
        b"\xd9\xa3",  # an Arabic-Indic digit three in UTF-8
        b"+5",
        b"0x5",
        b"5 5",
        b"1" * 40,  # over-long: no 64-bit integer holds it
    ],
)
async def test_a_content_length_that_is_not_ascii_digits_is_502_at_once(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext, length: bytes
) -> None:
    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n{}")
        peer.hold(10)

    with scripted_upstream(server_tls, script) as upstream:
        # Far above the test's own time limit: only an immediate refusal passes.
        proxy: RunningProxy = await start_proxy(
            mobilepay={"api_base_url": upstream.url}, upstream={"timeout_seconds": 20}
        )
        status, headers, _ = await proxy.request("GET", "/pos/v10/payments/p1", timeout=5)
    assert (status, headers["X-Proxy-Error"]) == (502, "upstream_bad_response")


BIG = 8 * 1024 * 1024


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_response_body_is_held_once(
    start_proxy: Callable[..., Any], server_tls: ssl.SSLContext, framing: str
) -> None:
    """The client's peak allocation for an 8 MiB body stays near 8 MiB, not two or three times."""
    body = b"x" * BIG
    if framing == "chunked":
        size = 1024 * 1024
        chunks = b"".join(
            b"%x\r\n" % size + body[start : start + size] + b"\r\n" for start in range(0, BIG, size)
        )
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    else:
        response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + body

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(response)  # from this buffer: the upstream side allocates nothing
        peer.hold(10)

    with scripted_upstream(server_tls, script) as upstream:
        proxy: RunningProxy = await start_proxy(mobilepay={"api_base_url": upstream.url})
        client = proxy.app[STATE].upstream
        assert client is not None
        url = URL(upstream.url + "/pos/v10/payments/p1")
        tracemalloc.start()
        try:
            answer = await client.send("GET", url, CIMultiDict(), b"")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert answer.status == 200
    assert len(answer.body) == BIG
    assert peak < 1.25 * BIG, f"peak {peak / BIG:.2f}x the body"
