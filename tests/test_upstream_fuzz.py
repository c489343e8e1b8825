"""The upstream response parser against h11, on generated responses split at random points.

Both must agree on accept or refuse, and on the status, headers and body of what they
accept. Where the two differ by design, the rule is spelled out once in :func:`_expected`,
each with its reason; nothing is excluded wholesale.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http1 import MAX_HEAD_BYTES, BadResponse, ResponseParser


@dataclass(frozen=True)
class Parsed:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # names lowercased, values as sent
    body: bytes


Outcome = Parsed | None  # None: refused


def _proxy(pieces: list[bytes]) -> Outcome:
    parser = ResponseParser()
    try:
        done = False
        for piece in pieces:
            done = parser.feed(piece)
        if not done and not parser.feed_eof(clean=True):
            return None
    except BadResponse:
        return None
    response = parser.response
    assert response is not None
    headers = tuple((name.lower(), value) for name, value in response.fields)
    return Parsed(response.status, headers, bytes(response.body))


@dataclass(frozen=True)
class H11Result:
    parsed: Outcome
    trailing: bytes  # bytes h11 left unread after the response


def _h11(raw: bytes) -> H11Result:
    """h11's reading of ``raw`` followed by a clean close (it buffers: splits do not matter)."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "mobilepay")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(raw)
    connection.receive_data(b"")
    response: h11.Response | None = None
    body = bytearray()
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                headers = tuple((name, value) for name, value in response.headers)
                trailing = connection.trailing_data[0]
                return H11Result(Parsed(response.status_code, headers, bytes(body)), trailing)
            elif not isinstance(event, h11.InformationalResponse):
                return H11Result(None, b"")  # closed before the end, or waiting for more
    except h11.RemoteProtocolError:
        return H11Result(None, b"")


_BARE_LF = re.compile(rb"(?<!\r)\n")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _heads(raw: bytes) -> list[bytes]:
    """Interim heads, then the final response's, as h11 finds them (bare LFs too)."""
    heads: list[bytes] = []
    while True:
        match = re.search(rb"\r?\n\r?\n", raw)
        if match is None:
            return [*heads, raw]
        head, raw = raw[: match.end()], raw[match.end() :]
        heads.append(head)
        if not re.match(rb"HTTP/1\.[01] 1\d\d", head):
            return heads


_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_CHUNK_EXTENSIONS = re.compile(
    rb'(?:;%s+(?:=(?:%s+|"[^"\\\x00-\x08\x0a-\x1f\x7f]*"))?)*' % (_TCHAR, _TCHAR)
)


def _chunked_parts(body: bytes) -> tuple[list[bytes], bytes]:
    """Each chunk-size line's extensions and the trailer section, read as h11 reads them."""
    extensions = []
    while (end := body.find(b"\r\n")) >= 0:
        size, semicolon, extension = body[:end].partition(b";")
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,20}", size):
            break
        extensions.append(semicolon + extension)
        if int(size, 16) == 0:
            rest = body[end:]  # from the CRLF ending the last-chunk line
            match = re.search(rb"\n\r?\n", rest)
            return extensions, rest if match is None else rest[: match.end()]
        body = body[end + 2 + int(size, 16) + 2 :]
    return extensions, b""


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The head's fields as sent, names lowercased: h11 reports them merged."""
    return [
        (name.strip().lower(), value.strip())
        for name, value in re.findall(rb"\n([^:\r\n]*):([^\r\n]*)", head)
    ]


_EMPTY_LINES_BEFORE_STATUS = re.compile(rb"(?:^|(?<=\r\n\r\n))[\r\n]+(?=HTTP/)")


def _expected(raw: bytes, reference: H11Result) -> Outcome:
    """What the proxy must answer, from h11's result and the rules where they differ."""
    # llhttp skips empty lines before a status line (the robustness rule of RFC 9112 2.2;
    # nothing is taken from them); h11 refuses them. Compare with h11 on the bytes without.
    without_empty_lines = _EMPTY_LINES_BEFORE_STATUS.sub(b"", raw)
    if without_empty_lines != raw:
        raw, reference = without_empty_lines, _h11(without_empty_lines)
    parsed = reference.parsed
    if parsed is None:
        return None
    *interim, head = _heads(raw)
    fields = _fields(head)
    names = [name for name, _ in fields]
    lengths = [value for name, value in fields if name == b"content-length"]
    heads = b"".join([*interim, head])
    extensions: list[bytes] = []
    if b"transfer-encoding" in names:
        extensions, trailers = _chunked_parts(raw[raw.index(head) + len(head) :])
        heads += trailers  # field lines too, under the same rules
    # h11 takes a bare LF for a line end; llhttp insists on CRLF (RFC 9112 2.2 allows
    # either only as robustness; a proxy must not guess where a line ends).
    if _BARE_LF.search(heads):
        return None
    # h11 unfolds obs-fold (a line starting with SP or HTAB); llhttp refuses it, which
    # RFC 9112 5.2 allows a recipient instead of unfolding.
    if re.search(rb"\n[ \t]", heads):
        return None
    # h11 refuses only NUL and whitespace other than SP and HTAB in a reason or a value;
    # llhttp refuses every control character there (RFC 9110 5.5, RFC 9112 4).
    if _CONTROL.search(heads.replace(b"\r\n", b"")):
        return None
    # h11 ignores what a chunk extension says; llhttp holds it to RFC 9112 7.1.1.
    if not all(_CHUNK_EXTENSIONS.fullmatch(extension) for extension in extensions):
        return None
    # h11 merges repeated or comma-listed equal Content-Lengths; llhttp refuses them
    # (RFC 9112 6.3 lets a recipient do either; refusing cannot smuggle).
    if len(lengths) > 1 or any(b"," in length for length in lengths):
        return None
    # h11 lets Transfer-Encoding override Content-Length; llhttp refuses the pair, the
    # classic smuggling vector (RFC 9112 6.1: "ought to be handled as an error").
    if lengths and b"transfer-encoding" in names:
        return None
    # h11 takes any digit.digit for the version; the proxy speaks HTTP/1.0 and 1.1 only.
    if not all(re.match(rb"HTTP/1\.[01] ", each) for each in [*interim, head]):
        return None
    # Content-Length and Transfer-Encoding are forbidden on 1xx responses, and
    # Transfer-Encoding on 204 and 304 (RFC 9110 8.6, RFC 9112 6.1): h11 ignores them
    # there, the proxy refuses what can only be a confused upstream.
    framing = {b"content-length", b"transfer-encoding"}
    if any(framing & {name for name, _ in _fields(early)} for early in interim):
        return None
    if parsed.status in (204, 304) and b"transfer-encoding" in names:
        return None
    # HTTP/1.0 has no interim responses (RFC 9110 15.2): llhttp reads one as the last
    # message on the connection and refuses what follows; h11 skips it.
    if any(early.startswith(b"HTTP/1.0") for early in interim):
        return None
    # HTTP status codes are 100-599 (RFC 9110 15); h11 takes any three digits.
    if not 100 <= parsed.status <= 599:
        return None
    # Anything after the response is refused: an upstream that sends more than it was asked
    # for cannot be trusted. llhttp skips empty lines before a message, so only CR and LF
    # bytes after a complete response pass (they are dropped with the connection anyway).
    if reference.trailing.strip(b"\r\n"):
        return None
    return parsed


def _comparable(outcome: Outcome) -> Outcome:
    """h11 lowercases Transfer-Encoding's value (case-insensitive, never relayed)."""
    if outcome is None:
        return None
    headers = tuple(
        (name, value.lower() if name == b"transfer-encoding" else value)
        for name, value in outcome.headers
    )
    return Parsed(outcome.status, headers, outcome.body)


def _chunked(body: bytes, sizes: list[int], extension: bytes, trailer: bytes) -> bytes:
    out = bytearray()
    start = 0
    for size in [*sizes, len(body)]:
        piece = body[start : start + size]
        start += len(piece)
        if piece:
            out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
        if start >= len(body):
            break
    return bytes(out) + b"0\r\n" + trailer + b"\r\n"


_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
    min_size=1,
    max_size=12,
)
_VALUE = st.binary(max_size=24).map(lambda b: bytes(c for c in b if c not in b"\r\n"))
_HEADER = st.one_of(
    st.tuples(_TOKEN.map(str.encode), _VALUE),
    st.tuples(
        st.sampled_from([b"Content-Type", b"Connection", b"Set-Cookie", b"Keep-Alive"]),
        st.sampled_from([b"application/json", b"close", b"keep-alive", b"a=b", b" x ", b""]),
    ),
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0"]))
    status = draw(
        st.one_of(
            st.sampled_from([200, 201, 204, 304, 400, 401, 404, 409, 500, 503]),
            st.integers(0, 999),
        )
    )
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not Found", b" \xe6\xf8"]))
    headers = draw(st.lists(_HEADER, max_size=5))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "close", "length+chunked", "lengths"]))
    lines = [b"%s %03d%s" % (version, status, reason)]
    lines += [name + b":" + value for name, value in headers]
    payload = body
    if framing in ("length", "length+chunked"):
        declared = draw(
            st.sampled_from([len(body), len(body), max(0, len(body) - 1), len(body) + 1])
        )
        lines.append(
            b"Content-Length: "
            + draw(st.sampled_from([b"%d", b" %d ", b"0%d", b"%d, %d"])).replace(
                b"%d", b"%d" % declared
            )
        )
    if framing == "lengths":
        lines += [b"Content-Length: %d" % len(body)] * 2
    if framing in ("chunked", "length+chunked"):
        lines.append(
            b"Transfer-Encoding: "
            + draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked", b"chunked, gzip"]))
        )
        sizes = draw(st.lists(st.integers(1, 64), max_size=4))
        extension = draw(st.sampled_from([b"", b";a=b", b";x"]))
        trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
        payload = _chunked(body, sizes, extension, trailer)
    interim = draw(st.sampled_from([b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    raw = interim + b"\r\n".join(lines) + b"\r\n\r\n" + payload
    if draw(st.booleans()):  # malformed: a byte changed, inserted or dropped
        position = draw(st.integers(0, max(0, len(raw) - 1)))
        byte = draw(
            st.sampled_from([b"\n", b"\r", b"\x00", b" ", b":", b"0", b"\x7f", b"\xff", b"", b"G"])
        )
        drop = draw(st.integers(0, 1))
        raw = raw[:position] + byte + raw[position + drop :]
    if draw(st.booleans()):
        raw += draw(st.sampled_from([b"\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"x"]))
    return raw


@st.composite
def splits(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    edges = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_parser_agrees_with_h11(data: st.DataObject) -> None:
    raw = data.draw(responses())
    pieces = data.draw(splits(raw))
    got = _proxy(pieces)
    reference = _h11(raw)
    assert _comparable(got) == _expected(raw, reference), (raw, reference)
