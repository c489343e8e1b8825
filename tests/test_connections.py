"""The terminal-facing listener as an HTTP/1.1 server, seen from raw sockets.

Keep-alive, pipelining, closing, request body framing, interim responses and idle
timeouts: what any HTTP/1.1 proxy owes its clients. Where HTTP/1.1 allows more than one
answer (closing or keeping a connection after an error, say), the tests pin the one the
README promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Exposure, RunningProxy
from tests.fakes import PosServer
from tests.helpers.rawhttp import Answer, Connection, request_bytes

M = ("X-Merchant-Id", "store-001")
IN_FLIGHT = "mobilepay_proxy_in_flight_requests"
TIMEOUTS = "mobilepay_proxy_timeouts_total"
# A connection the proxy keeps must show no sign of closing for this long.
STAYS_OPEN = 0.2


Connect = Callable[[RunningProxy], Awaitable[Connection]]


@pytest.fixture
async def connect(exposure: Exposure) -> AsyncIterator[Connect]:
    opened: list[Connection] = []

    async def open_connection(proxy: RunningProxy) -> Connection:
        connection = await Connection.open(proxy.url, exposure)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        await connection.close()


def get(path: str, *headers: tuple[str, str]) -> bytes:
    return request_bytes("GET", path, [M, *headers])


def http10(request: bytes) -> bytes:
    return request.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)


async def echo(request: web.Request, body: bytes) -> web.StreamResponse:
    """What an upstream that answers with what it received would say."""
    return web.json_response({"path": request.raw_path, "body": body.decode(errors="replace")})


def assert_framed(answer: Answer) -> None:
    """One Content-Length, matching the body, and no competing framing."""
    assert answer.all("content-length") == [str(len(answer.body))]
    assert answer.all("transfer-encoding") == []


async def test_keep_alive_serves_requests_one_after_another(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    for n in range(4):
        await connection.send(get(f"/pos/v10/payments/{n}"))
        answer = await connection.response()
        assert answer.status == 200
        assert answer.version == "HTTP/1.1"
        assert_framed(answer)
        assert answer.json()["path"] == f"/pos/v10/payments/{n}"
        assert "close" not in answer.connection_options()
    assert not await connection.closes(wait=STAYS_OPEN)
    assert [r.path_qs for r in pos_server.requests] == [f"/pos/v10/payments/{n}" for n in range(4)]


async def test_pipelined_requests_are_answered_in_order(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    async def first_is_slow(request: web.Request, body: bytes) -> web.StreamResponse:
        # Answers that came back out of order must still go out in request order.
        if request.raw_path.endswith("/a"):
            await asyncio.sleep(0.2)
        return await echo(request, body)

    pos_server.handler = first_is_slow
    connection = await connect(proxy)
    paths = ["/pos/v10/payments/a", "/pos/v10/payments/b", "/pos/v10/payments/c"]
    await connection.send(b"".join(get(path) for path in paths))
    answers = [await connection.response() for _ in paths]
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert [answer.json()["path"] for answer in answers] == paths
    for answer in answers:
        assert_framed(answer)
    # A proxy may forward pipelined requests concurrently, so arrival order is free.
    assert sorted(r.path_qs for r in pos_server.requests) == paths
    assert not await connection.closes(wait=STAYS_OPEN)


async def test_connection_close_ends_the_connection_after_the_response(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/last", ("Connection", "close")))
    answer = await connection.response()
    assert answer.status == 200
    assert answer.json()["path"] == "/pos/v10/payments/last"
    assert "keep-alive" not in answer.connection_options()
    assert await connection.closes()
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/last"]


async def test_requests_pipelined_after_connection_close_are_not_processed(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(
        get("/pos/v10/payments/last", ("Connection", "close")) + get("/pos/v10/payments/after")
    )
    # RFC 9112 9.6: answer the request that says close, then nothing more.
    answer = await connection.response()
    assert (answer.status, answer.json()["path"]) == (200, "/pos/v10/payments/last")
    assert "close" in answer.connection_options()
    assert await connection.closes()
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/last"]


async def test_http10_request_is_answered_then_closed(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(http10(get("/pos/v10/payments/old")))
    answer = await connection.response()
    # The highest version the proxy speaks, as RFC 9110 2.5 asks.
    assert (answer.version, answer.status) == ("HTTP/1.1", 200)
    # An HTTP/1.0 client cannot read chunked framing (RFC 9112 6.1).
    assert answer.all("transfer-encoding") == []
    assert answer.json()["path"] == "/pos/v10/payments/old"
    assert "keep-alive" not in answer.connection_options()
    assert await connection.closes()
    assert len(pos_server.requests) == 1


async def test_http10_keep_alive_is_kept_and_said(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    request = http10(get("/pos/v10/payments/1", ("Connection", "keep-alive")))
    for n in (1, 2):
        await connection.send(request.replace(b"/payments/1", b"/payments/%d" % n))
        answer = await connection.response()
        assert answer.status == 200
        assert answer.all("transfer-encoding") == []
        assert answer.json()["path"] == f"/pos/v10/payments/{n}"
        # An HTTP/1.0 client assumes the connection closes unless the response says
        # keep-alive (RFC 9112 appendix C.2.2).
        assert answer.connection_options() == {"keep-alive"}
    assert not await connection.closes(wait=STAYS_OPEN)
    assert len(pos_server.requests) == 2


async def test_chunked_request_body_is_forwarded_whole_with_a_length(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    parts = [b'{"amount": 12.5, ', b'"posId": "p1", ', b'"orderId": "' + b"o" * 40 + b'"}']
    connection = await connect(proxy)
    await connection.send(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for part in parts:
        await asyncio.sleep(0.05)
        await connection.send(b"%x\r\n%s\r\n" % (len(part), part))
    await asyncio.sleep(0.05)
    await connection.send(b"0\r\n\r\n")
    answer = await connection.response()
    assert answer.status == 200
    payload = b"".join(parts)
    (received,) = pos_server.requests
    assert received.body == payload
    assert received.headers.getall("Content-Length") == [str(len(payload))]
    assert "Transfer-Encoding" not in received.headers
    assert not await connection.closes(wait=STAYS_OPEN)


@pytest.mark.parametrize(
    "broken",
    [b"zz\r\nabc\r\n", b"3\r\nabcdef\r\n", b"3;\x00\r\nabc\r\n"],
    ids=["size not hex", "chunk longer than its size", "control byte in an extension"],
)
async def test_a_broken_chunk_mid_body_is_400_and_nothing_is_forwarded(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect, broken: bytes
) -> None:
    connection = await connect(proxy)
    await connection.send(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await asyncio.sleep(0.05)
    await connection.send(broken)
    answer = await connection.response()
    assert (answer.status, answer.json()["code"]) == (400, "malformed_request")
    assert await connection.closes()
    assert pos_server.requests == []


async def test_a_terminal_that_stops_mid_body_gets_nothing_forwarded(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Content-Length: 100\r\n\r\n" + b"x" * 40
    )
    # Half-close: the terminal has finished sending and waits for an answer.
    connection.finish_sending()
    answer = await connection.response()
    assert (answer.status, answer.json()["code"]) == (400, "incomplete_body")
    assert await connection.closes()
    assert pos_server.requests == []


async def test_request_body_split_across_writes_arrives_whole(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    payload = b'{"amount": 99, "posId": "p1", "orderId": "' + b"x" * 200 + b'"}'
    raw = request_bytes(
        "POST", "/pos/v10/payments", [M, ("Content-Type", "application/json")], payload
    )
    head_end = raw.index(b"\r\n\r\n")
    # Cut inside the header section, at its end, and twice inside the body.
    cuts = [0, 20, head_end + 2, head_end + 4 + 10, head_end + 4 + 150, len(raw)]
    connection = await connect(proxy)
    for start, end in itertools.pairwise(cuts):
        await connection.send(raw[start:end])
        await asyncio.sleep(0.05)
    answer = await connection.response()
    assert answer.status == 200
    (received,) = pos_server.requests
    assert received.body == payload
    assert received.headers.getall("Content-Length") == [str(len(payload))]


async def test_error_answer_keeps_the_connection_usable(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(
        request_bytes("GET", "/pos/v10/payments/1", [("X-Merchant-Id", "store-999")])
    )
    error = await connection.response()
    assert error.status == 403
    assert (error.header("content-type") or "").startswith("application/json")
    assert error.json()["code"] == "unknown_merchant"
    assert_framed(error)
    assert "close" not in error.connection_options()
    await connection.send(get("/pos/v10/payments/2"))
    answer = await connection.response()
    assert answer.status == 200
    assert answer.json()["path"] == "/pos/v10/payments/2"
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/2"]


async def test_unread_body_of_a_refused_request_is_never_taken_for_a_request(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    smuggled = get("/pos/v10/payments/smuggled")
    refused = request_bytes("POST", "/pos/v10/payments", [("X-Merchant-Id", "store-999")], smuggled)
    connection = await connect(proxy)
    await connection.send(refused + get("/pos/v10/payments/next"))
    error = await connection.response()
    assert error.status == 403
    # The refused body is read and dropped: the connection goes on with the next request.
    assert "close" not in error.connection_options()
    answer = await connection.response()
    assert (answer.status, answer.json()["path"]) == (200, "/pos/v10/payments/next")
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/next"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_the_limit_is_413_and_the_connection_closes(
    start_proxy: Callable[..., Any], pos_server: PosServer, connect: Connect, framing: str
) -> None:
    proxy: RunningProxy = await start_proxy(server={"max_body_bytes": 100})
    connection = await connect(proxy)
    head = b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
    # Clients send the whole body without waiting; the 413 must still reach them.
    if framing == "content-length":
        await connection.send(head + b"Content-Length: 500\r\n\r\n" + b"y" * 500)
    else:
        await connection.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
        await connection.send(b"c8\r\n" + b"y" * 200 + b"\r\n" + b"0\r\n\r\n")
    answer = await connection.response()
    assert answer.status == 413
    assert answer.json()["code"] == "body_too_large"
    assert await connection.closes()
    assert pos_server.requests == []


async def test_client_gone_while_upstream_is_slow_leaves_the_proxy_healthy(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow_for_one(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.raw_path.endswith("/slow"):
            entered.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 5)
        return await echo(request, body)

    pos_server.handler = slow_for_one
    gone = await connect(proxy)
    await gone.send(get("/pos/v10/payments/slow"))
    await asyncio.wait_for(entered.wait(), 5)
    assert proxy.sample(IN_FLIGHT) == 1
    await gone.close()

    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/meanwhile"))
    answer = await connection.response()
    assert (answer.status, answer.json()["path"]) == (200, "/pos/v10/payments/meanwhile")

    release.set()
    for _ in range(300):
        if proxy.sample(IN_FLIGHT) == 0:
            break
        await asyncio.sleep(0.01)
    assert proxy.sample(IN_FLIGHT) == 0
    # The abandoned answer must not surface as the answer to a later request.
    await connection.send(get("/pos/v10/payments/after"))
    answer = await connection.response()
    assert (answer.status, answer.json()["path"]) == (200, "/pos/v10/payments/after")
    fresh = await connect(proxy)
    await fresh.send(get("/pos/v10/payments/fresh"))
    answer = await fresh.response()
    assert (answer.status, answer.json()["path"]) == (200, "/pos/v10/payments/fresh")


async def test_responses_carry_a_date_one_length_and_no_hop_by_hop_headers(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    async def hop_by_hop(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(
            body=b'{"ok": true}',
            content_type="application/json",
            headers={
                "Connection": "X-Foo",
                "X-Foo": "hop-only",
                "Keep-Alive": "timeout=5",
                "Proxy-Connection": "keep-alive",
                "X-Kept": "end-to-end",
            },
        )

    pos_server.handler = hop_by_hop
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/1"))
    relayed = await connection.response()
    await connection.send(request_bytes("GET", "/pos/v10/payments/1", []))
    own = await connection.response()
    assert (relayed.status, own.status) == (200, 400)
    assert relayed.body == b'{"ok": true}'
    assert relayed.header("X-Kept") == "end-to-end"
    for name in ("X-Foo", "Keep-Alive", "Proxy-Connection"):
        assert relayed.all(name) == []
    assert relayed.connection_options() <= {"keep-alive", "close"}
    for answer in (relayed, own):
        assert_framed(answer)
        date = answer.header("Date")
        assert date is not None
        assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 60


async def test_idle_connection_is_closed_after_the_keep_alive_timeout(
    start_proxy: Callable[..., Any], connect: Connect
) -> None:
    proxy: RunningProxy = await start_proxy(server={"keepalive_timeout_seconds": 0.5})
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/1"))
    assert (await connection.response()).status == 200
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    assert await connection.closes(wait=3)
    assert loop.time() - idle_since > 0.45, "closed before the keep-alive timeout"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    payload = b'{"amount": 1, "posId": "p1"}'
    connection = await connect(proxy)
    head = request_bytes("POST", "/pos/v10/payments", [M, ("Expect", "100-continue")], payload)
    await connection.send(head.removesuffix(payload))
    # A client like curl waits a second for this before sending the body anyway.
    interim = await connection.response(wait=0.5, interim=True)
    assert (interim.version, interim.status, interim.body) == ("HTTP/1.1", 100, b"")
    await connection.send(payload)
    answer = await connection.response()
    assert answer.status == 200
    (received,) = pos_server.requests
    assert received.body == payload
    assert "Expect" not in received.headers


async def test_expect_100_continue_with_a_body_over_the_limit_is_refused_unsent(
    start_proxy: Callable[..., Any], pos_server: PosServer, connect: Connect
) -> None:
    proxy: RunningProxy = await start_proxy(server={"max_body_bytes": 100})
    connection = await connect(proxy)
    await connection.send(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    # The final status follows from the header section, so it comes without the body.
    answer = await connection.response(wait=1.0)
    assert answer.status == 413
    assert answer.json()["code"] == "body_too_large"
    assert pos_server.requests == []


async def test_bad_request_after_a_good_one_gets_json_400_and_a_close(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/1"))
    assert (await connection.response()).status == 200
    await connection.send(
        b"GET /pos/v10/payments/2 HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Not A Header Line\r\n\r\n"
    )
    answer = await connection.response()
    assert (answer.version, answer.status) == ("HTTP/1.1", 400)
    assert "close" in answer.connection_options()
    assert (answer.header("content-type") or "").startswith("application/json")
    assert answer.json()["code"] == "malformed_request"
    assert answer.header("X-Proxy-Error") == "malformed_request"
    assert await connection.closes()
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/1"]


@pytest.mark.slow  # waits out deadlines of about a second
async def test_a_second_request_head_trickling_in_is_cut_off(
    start_proxy: Callable[..., Any], pos_server: PosServer, connect: Connect
) -> None:
    proxy: RunningProxy = await start_proxy(
        server={"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 30}
    )
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/1"))
    assert (await connection.response()).status == 200
    # Idle well past the header timeout: only the keep-alive timeout applies while idle.
    await asyncio.sleep(0.8)
    started = asyncio.get_running_loop().time()
    closed = False
    for byte in get("/pos/v10/payments/2")[:-4]:
        try:
            await connection.send(bytes([byte]))
        except ConnectionError:
            closed = True
            break
        await asyncio.sleep(0.05)
        if asyncio.get_running_loop().time() - started > 3:
            break
    assert closed or await connection.closes(wait=1)
    # Not before the header timeout, counted as a head that came too slowly: the keep-alive
    # timeout (30 s) never ran out.
    assert asyncio.get_running_loop().time() - started > 0.45
    assert proxy.sample(TIMEOUTS, {"phase": "request_head"}) == 1
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/1"]


async def test_keep_alive_off_closes_after_each_answer(
    start_proxy: Callable[..., Any], connect: Connect
) -> None:
    proxy: RunningProxy = await start_proxy(server={"keepalive_timeout_seconds": 0})
    connection = await connect(proxy)
    await connection.send(get("/pos/v10/payments/1"))
    answer = await connection.response()
    assert answer.status == 200
    assert "close" in answer.connection_options()
    assert await connection.closes()


async def test_a_refusal_instead_of_100_continue_closes_the_connection(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    await connection.send(
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: nobody\r\n"
        b"Expect: 100-continue\r\nContent-Length: 20\r\n\r\n"
    )
    # The terminal never sends the body: it got a final answer instead of the 100.
    answer = await connection.response(wait=1.0)
    assert (answer.status, answer.json()["code"]) == (403, "unknown_merchant")
    assert "close" in answer.connection_options()
    assert await connection.closes(wait=0.5)
    assert pos_server.requests == []


async def test_a_good_request_before_a_malformed_one_in_one_segment_is_answered_first(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    connection = await connect(proxy)
    malformed = (
        b"GET /pos/v10/payments/2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n"
        b"X-Merchant-Id: store-001\r\n\r\n"
    )
    await connection.send(get("/pos/v10/payments/1") + malformed)
    first = await connection.response()
    assert (first.status, first.json()["path"]) == (200, "/pos/v10/payments/1")
    second = await connection.response()
    assert (second.status, second.json()["code"]) == (400, "malformed_request")
    assert "close" in second.connection_options()
    assert await connection.closes()
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/1"]


@pytest.mark.parametrize(
    "trailer",
    [("X-Merchant-Id", "store-002"), ("X-MobilePay-Idempotency-Key", "k-trailer")],
    ids=["routing header", "idempotency key"],
)
async def test_request_trailers_are_refused_and_never_reach_the_next_request(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect, trailer: tuple[str, str]
) -> None:
    name, value = trailer
    connection = await connect(proxy)
    first = (
        b"POST /pos/v10/payments HTTP/1.1\r\nHost: proxy\r\nX-Merchant-Id: store-001\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + f"{name}: {value}\r\n\r\n".encode()
    )
    # Without a routing header of its own (or a key), only a leaked trailer could route it.
    second = request_bytes("POST", "/pos/v10/payments", [] if name == M[0] else [M], b"{}")
    await connection.send(first + second)
    answer = await connection.response()
    assert (answer.status, answer.json()["code"]) == (400, "malformed_request")
    assert "close" in answer.connection_options()
    assert await connection.closes()
    assert pos_server.requests == []


async def test_http10_expect_100_continue_gets_no_interim_response(
    proxy: RunningProxy, pos_server: PosServer, connect: Connect
) -> None:
    payload = b'{"amount": 1, "posId": "p1"}'
    request = request_bytes("POST", "/pos/v10/payments", [M, ("Expect", "100-continue")], payload)
    connection = await connect(proxy)
    # RFC 9110 10.1.1: an HTTP/1.0 client cannot expect 100 Continue; ignore the expectation.
    await connection.send(http10(request))
    answer = await connection.response(interim=True)
    assert answer.status == 200
    (received,) = pos_server.requests
    assert received.body == payload


async def test_a_partial_second_head_sent_with_the_first_request_gets_the_header_timeout(
    start_proxy: Callable[..., Any], pos_server: PosServer, connect: Connect
) -> None:
    proxy: RunningProxy = await start_proxy(
        server={"header_timeout_seconds": 0.3, "keepalive_timeout_seconds": 30}
    )
    connection = await connect(proxy)
    partial = b"GET /pos/v10/payments/2 HTTP/1.1\r\nHost: a\r\n"
    await connection.send(get("/pos/v10/payments/1") + partial)
    assert (await connection.response()).status == 200
    # The keep-alive timeout (30 s) is for a connection with nothing pending; this one has
    # a head in progress, due within the header timeout of its first byte.
    assert await connection.closes(wait=3)
    assert [r.path_qs for r in pos_server.requests] == ["/pos/v10/payments/1"]
    assert proxy.sample("mobilepay_proxy_timeouts_total", {"phase": "request_head"}) == 1
