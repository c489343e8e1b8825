"""The upstream response parser: strict framing, fed in every possible split."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.http1 import BadResponse, Response, ResponseParser, serialise_headers


def _parse(raw: bytes, *, step: int | None = None, eof: bool = False) -> tuple[Response, bool]:
    """The response and whether its connection may carry another request."""
    parser = ResponseParser()
    step = step or len(raw) or 1
    done = False
    for start in range(0, len(raw), step):
        assert not done, "complete before all bytes arrived"
        done = parser.feed(raw[start : start + step])
    if eof and not done:
        done = parser.feed_eof(clean=True)
    assert done
    assert parser.response is not None
    return parser.response, parser.reusable


@pytest.mark.parametrize("step", [None, 1, 7])
def test_content_length(step: int | None) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"ok":true}'
    )
    response, keep_alive = _parse(raw, step=step)
    assert (response.status, response.reason, bytes(response.body)) == (200, "OK", b'{"ok":true}')
    assert response.headers["Content-Type"] == "application/json"
    assert keep_alive


@pytest.mark.parametrize("step", [None, 1, 5])
def test_chunked_with_extensions_and_trailers(step: int | None) -> None:
    raw = (
        b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    response, _ = _parse(raw, step=step)
    assert (response.status, bytes(response.body)) == (409, b"abcdefg")


def test_interim_responses_are_skipped_and_repeated_headers_kept() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nSet-Cookie: a\r\n"
        b"Set-Cookie: b\r\nContent-Length: 0\r\n\r\n"
    )
    response, _ = _parse(raw)
    assert response.status == 201
    assert response.headers.getall("Set-Cookie") == ["a", "b"]


def test_no_body_statuses_and_read_until_close() -> None:
    assert _parse(b"HTTP/1.1 204 No Content\r\n\r\n")[0].body == b""
    response, keep_alive = _parse(b"HTTP/1.1 200 OK\r\n\r\nall of it", eof=True)
    assert (bytes(response.body), keep_alive) == (b"all of it", False)
    assert not _parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[1]
    assert not _parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[1]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 30 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        # NBSP is whitespace to str.strip(), not to llhttp: read as chunked by one, not the other
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 999 Beyond\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (200 * 1024),
    ],
)
def test_ambiguous_or_broken_framing_is_refused(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        _feed_in_reads(ResponseParser(), raw)


def _feed_in_reads(parser: ResponseParser, raw: bytes) -> None:
    """As the connection would: one read of at most 64 KiB at a time."""
    for start in range(0, len(raw), 65536):
        parser.feed(raw[start : start + 65536])


def test_truncated_body_is_not_complete() -> None:
    parser = ResponseParser()
    assert not parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not parser.feed_eof(clean=True)


def test_a_close_delimited_body_needs_a_clean_end() -> None:
    parser = ResponseParser()
    assert not parser.feed(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert not parser.feed_eof(clean=False)
    assert parser.response is None


def test_bytes_after_a_complete_response_are_refused() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    with pytest.raises(BadResponse):
        parser.feed(b"H")


def test_a_body_is_held_in_one_buffer_of_its_declared_size() -> None:
    response, _ = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", step=2)
    assert isinstance(response.body, bytearray)
    assert response.body == b"hello"


def test_serialised_request_head() -> None:
    headers = CIMultiDict([("Accept", "a"), ("Accept", "b"), ("X-Name", "\u00e6")])
    head = serialise_headers("POST", "api.example", headers, b"{}")
    assert head == (
        b"Host: api.example\r\nAccept: a\r\nAccept: b\r\nX-Name: \xc3\xa6\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    assert b"Content-Length: 0" in serialise_headers("POST", "h", CIMultiDict(), b"")
    assert b"Content-Length" not in serialise_headers("GET", "h", CIMultiDict(), b"")
