"""A lean, strict HTTP/1.1 client for the one upstream the proxy talks to on the hot path.

Why not aiohttp's client: profiling under load showed ``ClientSession.request`` taking
about 40 % of the proxy's CPU per request, most of it generality this proxy never uses
(cookies, redirects, proxies, auth, compression, streaming). This client does exactly what
forwarding needs: keep-alive TLS connections from a small pool, one serialised request,
and a response parsed in full by llhttp (through httptools), strictly — any framing it does
not understand is an error, never a guess. The token endpoint, called rarely, still uses
aiohttp.

Every phase has its own deadline, each capped by the request's overall deadline: the wait
for a free connection, connecting (TCP and TLS), sending the request, and from then on the
whole response. A connection goes back to the pool only when its request was sent whole and
its response was framed by Content-Length or chunked encoding and ended exactly there.

Errors are reported in the kinds forwarding needs: :class:`ConnectionFailed` when not one
byte of a response arrived (the request may be resent if that is safe), :class:`Timeout`
naming the phase whose deadline expired, and :class:`BadResponse` for everything else.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import NamedTuple

import httptools
from multidict import CIMultiDict
from yarl import URL

# Far more than any PoS V10 answer; a response beyond it is not relayed.
MAX_HEAD_BYTES = 64 * 1024  # also bounds a chunk-size line and the trailers
MAX_HEADERS = 200
MAX_BODY_BYTES = 16 * 1024 * 1024
# A TLS record holds at most 16 KiB; a larger read buffer would only cost an mmap per read.
READ_SIZE = 64 * 1024
_NO_BODY = (204, 304)
_CONTROLS = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"  # HTAB is allowed


class BadResponse(Exception):
    """The upstream's bytes are not a response this client will relay."""


class ConnectionFailed(Exception):
    """The connection failed before any byte of a response arrived."""


class Timeout(Exception):
    """A deadline expired; ``phase`` is the one that did (a ``Metrics.timeouts`` label).

    ``request_deadline`` when the request's overall deadline came before the phase's own.
    """

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


HeaderFields = list[tuple[bytes, bytes]]


class Response(NamedTuple):
    status: int
    reason: str
    # The header fields as they arrived (trailers excluded), each value without its
    # surrounding whitespace: relayed as bytes, never decoded on the way through.
    fields: HeaderFields
    names: list[bytes]  # the fields' names lower-cased, in the same order
    body: bytearray  # the one copy: filled as it arrived, handed on as it is

    @property
    def headers(self) -> CIMultiDict[str]:
        """The fields decoded (latin-1), for the few who read them; a new dict each time."""
        return CIMultiDict(
            [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.fields]
        )


class ResponseParser:
    """Responses to GET, POST or DELETE, one at a time, parsed by llhttp and checked strictly.

    Feed it bytes as they arrive; :meth:`feed` raises :class:`BadResponse` for anything it
    will not relay, and :meth:`reset` readies it for the next response on the connection.
    Beyond llhttp's own strictness (no obs-fold, no bare CR or LF, no Content-Length with
    Transfer-Encoding, no duplicate or non-digit Content-Length), it refuses a version other
    than 1.0 and 1.1, a status outside 100-599, a control character in the reason, a
    transfer coding other than ``chunked``, framing headers on a 1xx (and
    Transfer-Encoding on a 204 or 304), a protocol switch, bytes after the response, and
    heads, trailers or bodies beyond their limits.
    Interim (1xx) responses are skipped; trailers are read and dropped.

    The ``on_*`` methods are llhttp's callbacks, not for callers.
    """

    def __init__(self) -> None:
        # Refers back to this object: close() lets go of it, or the two live until the
        # cycle collector runs.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        """Make ready for the next response on the same connection.

        llhttp's state is kept (building it costs more than parsing a small response); it
        is where the last response left it, which is only a fresh start after a
        :attr:`reusable` one.
        """
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)
        self._fields: HeaderFields = []
        self._names: list[bytes] = []
        self._reason = b""
        self._status = 0
        self._in_head = True
        self._body = bytearray()
        self._view: memoryview | None = None  # over _body when its length is known
        self._filled = 0
        self._until_close = False
        self._keep_alive = False
        self._complete = False
        # Complete, framed by length or chunks, and the upstream keeps the connection.
        self.reusable = False
        self._progressed = False
        self._stalled = 0  # bytes fed since the parser last made progress
        self._error: str | None = None
        self.response: Response | None = None

    def feed(self, data: bytes) -> bool:
        """Take more bytes; True once the response is complete."""
        parser = self._parser
        if parser is None:
            raise BadResponse("bytes after the end of the connection")
        self._progressed = False
        try:
            parser.feed_data(data)
            if self._progressed:
                self._stalled = len(data)
            else:
                self._stalled += len(data)
            if not self._complete and self._stalled > MAX_HEAD_BYTES + READ_SIZE:
                raise BadResponse("response head, chunk line or trailers too large")
        except BadResponse:
            self.close()
            raise
        except httptools.HttpParserError as exc:
            self.close()
            raise BadResponse(self._error or str(exc) or type(exc).__name__) from None
        except Exception as exc:  # nothing else may escape into an event loop callback
            self.close()
            raise BadResponse(f"unparseable response: {type(exc).__name__}") from None
        return self._complete

    def feed_eof(self, *, clean: bool) -> bool:
        """The connection ended; True if that completed a close-delimited response.

        ``clean``: TLS said so (close_notify). Without it the end may be a truncation.
        """
        self.close()
        if self._complete or not self._until_close or not clean:
            return False
        self._complete = True
        self._finish()
        return True

    def close(self) -> None:
        """Let go of llhttp's state; later bytes are refused."""
        self._parser = None

    def _finish(self) -> None:
        self.response = Response(
            self._status, self._reason.decode("latin-1"), self._fields, self._names, self._body
        )

    def _refuse(self, reason: str) -> None:
        self._error = reason
        raise BadResponse(reason)  # llhttp stops; feed() reports self._error

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            self._refuse("bytes after the response")
        self._progressed = True
        self._fields = []
        self._reason = b""
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: read, not relayed
        fields = self._fields
        if len(fields) >= MAX_HEADERS:
            self._refuse("too many response headers")
        fields.append((name, value.rstrip(b" \t")))  # llhttp has dropped the leading OWS

    def on_headers_complete(self) -> None:
        self._progressed = True
        self._in_head = False
        parser = self._parser
        assert parser is not None  # llhttp calls back only from feed()
        status = parser.get_status_code()
        if status == 101:
            self._refuse("unexpected protocol switch")
        if parser.get_http_version() not in ("1.1", "1.0"):
            self._refuse("not an HTTP/1.x response")
        if not 100 <= status <= 599:
            self._refuse("status code out of range")
        reason = self._reason
        if len(reason.translate(None, _CONTROLS)) != len(reason):
            self._refuse("control character in the reason phrase")  # llhttp takes NUL
        self._status = status
        fields = self._fields
        names = self._names = [name.lower() for name, _ in fields]
        codings = (
            [
                coding.strip().lower()
                for name, (_, value) in zip(names, fields, strict=True)
                if name == b"transfer-encoding"
                for coding in value.split(b",")
            ]
            if b"transfer-encoding" in names
            else None
        )
        length = fields[names.index(b"content-length")][1] if b"content-length" in names else None
        if codings and (status < 200 or status in _NO_BODY):
            self._refuse("Transfer-Encoding on a response that has no body")  # RFC 9112 6.1
        if status < 200:
            if length is not None:
                self._refuse("Content-Length on an interim response")  # RFC 9110 8.6
            return  # the real response follows
        if codings and codings != [b"chunked"]:
            self._refuse("unsupported transfer coding")
        if status in _NO_BODY:
            pass
        elif length is not None and not codings:
            size = int(length)  # llhttp has checked: ASCII digits, no overflow, one value
            if size > MAX_BODY_BYTES:
                self._refuse("response body too large")
            self._body = bytearray(size)
            self._view = memoryview(self._body)
        elif not codings:
            self._until_close = True
        self._keep_alive = parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self._progressed = True
        size = len(chunk)
        view = self._view
        if view is not None:
            view[self._filled : self._filled + size] = chunk
            self._filled += size
            return
        if len(self._body) + size > MAX_BODY_BYTES:
            self._refuse("response body too large")
        self._body += chunk

    def on_chunk_header(self) -> None:
        self._progressed = True

    def on_message_complete(self) -> None:
        self._progressed = True
        if self._status < 200:
            self._status = 0
            return
        if self._view is not None:
            self._view.release()
            self._view = None
        self._complete = True
        self.reusable = self._keep_alive  # framed: a close-delimited body never gets here
        self._finish()


class _Connection:
    """One keep-alive TLS connection, read and written as a non-blocking ``SSLSocket``.

    Why not an asyncio transport: a TLS transport passes every record through memory BIOs
    and a state machine of its own; letting OpenSSL read and write the socket directly, with
    the event loop only reporting readiness, measured about a quarter less CPU per exchange.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
        self.closed = False
        self.idle_since = time.monotonic()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._responses = ResponseParser()  # one per connection: llhttp is costly to build
        self._parser: ResponseParser | None = None  # while a response is awaited
        self._waiter: asyncio.Future[Response] | None = None
        self._received = False
        self._writable_waiter: asyncio.Future[None] | None = None
        self._unsent = memoryview(b"")  # the rest of the request being sent
        # Registered for the connection's whole life: an idle connection notices at once
        # when the upstream closes it, or sends bytes nobody asked for.
        loop.add_reader(self._fd, self._readable)

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext) -> _Connection:
        """Connect to the first address of ``host`` that answers and complete the handshake."""
        loop = asyncio.get_running_loop()
        sock = await _connect_tcp(loop, host, port)
        try:
            # A TCP FIN without TLS close_notify must read as an error, not as an end: it is
            # all that tells a truncated close-delimited response from a whole one.
            tls = context.wrap_socket(
                sock,
                server_hostname=host,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
            )
        except BaseException:
            sock.close()
            raise
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _ready(loop, tls.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, tls.fileno(), write=True)
        except BaseException:
            tls.close()
            raise
        return cls(loop, tls)

    async def exchange(
        self, request: bytes, send_seconds: float, read_seconds: float, deadline: float
    ) -> Response:
        """Send a request and wait for its whole response.

        Sending has ``send_seconds``; from then on the response has ``read_seconds``
        (both capped by ``deadline``). A complete response that arrives while the request is
        still being sent ends the sending: the upstream has answered without reading it all.
        """
        if self.closed:
            raise ConnectionFailed("connection already closed")
        parser = self._parser = self._responses
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        self._received = False
        sent = False
        timer: asyncio.TimerHandle | None = None
        try:
            # A request the socket takes at once (the usual case) needs no send timer: a
            # plain timer per phase that waits is cheaper than an asyncio.timeout() scope.
            written = self._send_now(request)
            sent = written is True
            if written is False and not waiter.done():
                send_until = _limit(self._loop, send_seconds, "upstream_send", deadline)
                timer = self._loop.call_at(send_until.at, self._time_out, waiter, send_until.phase)
                sent = await self._send(waiter)
                timer.cancel()
            if not waiter.done():
                read_until = _limit(self._loop, read_seconds, "upstream_read", deadline)
                timer = self._loop.call_at(read_until.at, self._time_out, waiter, read_until.phase)
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._parser = self._waiter = None
            self.idle_since = time.monotonic()
            if sent and parser.reusable:
                parser.reset()  # and so lets go of the response
            else:
                self.close()

    def _send_now(self, data: bytes) -> bool | None:
        """Write what the socket takes now: True if all of it, None if sending failed.

        After a failure nothing more is sent: the upstream may have answered and closed,
        and its response, or the end of the connection, reaches the reader.
        """
        self._unsent = view = memoryview(data)
        try:
            sent = self._sock.send(view)
        except ssl.SSLWantWriteError:
            return False
        except OSError:
            return None
        self._unsent = view[sent:]
        return not self._unsent

    async def _send(self, waiter: asyncio.Future[Response]) -> bool:
        """Write the rest until done or ``waiter`` is; True if all of it was written."""
        view = self._unsent
        while view and not waiter.done():
            await self._writable()
            if waiter.done():
                break
            try:
                sent = self._sock.send(view)
            except ssl.SSLWantWriteError:
                sent = 0
            except OSError:
                return False
            view = view[sent:]
        self._unsent = view
        return not view

    async def _writable(self) -> None:
        """Wait until the socket takes more bytes, the response is done or the connection is."""
        writable = self._writable_waiter = self._loop.create_future()
        self._loop.add_writer(self._fd, _wake, writable)
        try:
            await writable
        finally:
            self._writable_waiter = None
            if not self.closed:
                self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        sock = self._sock
        while not self.closed:
            try:
                data = sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except OSError:  # a reset, a TLS alert, or a FIN without close_notify
                self._ended(clean=False)
                return
            if not data:  # close_notify: the upstream said it is done
                self._ended(clean=True)
                return
            self._data_received(data)
            # Bytes still in the kernel wake this again; only what OpenSSL has already
            # decrypted must be read now. Not reading until EAGAIN saves a syscall.
            if not sock.pending():
                return

    def _data_received(self, data: bytes) -> None:
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        self._received = True
        try:
            done = parser.feed(data)
        except BadResponse as exc:
            self.close()
            waiter.set_exception(exc)
            return
        if done:
            assert parser.response is not None
            waiter.set_result(parser.response)
            self._wake_sender()  # a request still being sent stops here

    def _ended(self, *, clean: bool) -> None:
        self.close()
        parser, waiter = self._parser, self._waiter
        if waiter is None or waiter.done():
            return
        if parser is not None and parser.feed_eof(clean=clean):
            assert parser.response is not None
            waiter.set_result(parser.response)
        elif self._received:
            reason = "connection closed" if clean else "connection broken without close_notify"
            waiter.set_exception(BadResponse(f"{reason} mid-response"))
        else:
            waiter.set_exception(ConnectionFailed("connection closed before a response"))

    def _time_out(self, waiter: asyncio.Future[Response], phase: str) -> None:
        if not waiter.done():
            self.close()
            waiter.set_exception(Timeout(phase))

    def _wake_sender(self) -> None:
        writable = self._writable_waiter
        if writable is not None and not writable.done():
            writable.set_result(None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._responses.close()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._wake_sender()


class _Limit(NamedTuple):
    """When a phase ends (loop time), and the phase to blame: its own or the request's."""

    at: float
    phase: str


def _limit(loop: asyncio.AbstractEventLoop, seconds: float, phase: str, deadline: float) -> _Limit:
    at = loop.time() + seconds
    return _Limit(at, phase) if at < deadline else _Limit(deadline, "request_deadline")


async def _connect_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, protocol, _, address in infos:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    raise error


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    ready: asyncio.Future[None] = loop.create_future()
    watch, unwatch = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    watch(fd, _wake, ready)
    try:
        await ready
    finally:
        unwatch(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ConnectionPool:
    """Keep-alive TLS connections per origin, at most ``limit`` in use at once."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        limit: int,
        connect_timeout: float,
        send_timeout: float,
        read_timeout: float,
        pool_timeout: float,
        keepalive_timeout: float,
    ) -> None:
        self._context = context
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._read_timeout = read_timeout
        self._pool_timeout = pool_timeout
        self._keepalive_timeout = keepalive_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(limit)

    async def request(
        self, method: str, url: URL, head: bytes, body: bytes, deadline: float
    ) -> Response:
        """Send one request; ``head`` is the serialised header block after the request line.

        ``deadline`` (event loop time) caps every phase; past it, nothing more is sent.
        """
        loop = asyncio.get_running_loop()
        host, port = url.raw_host or "", url.port or 443
        request = b"".join((f"{method} {url.raw_path_qs} HTTP/1.1\r\n".encode(), head, body))
        if self._slots.locked() or loop.time() >= deadline:
            await self._wait_for_slot(loop, deadline)
        else:
            await self._slots.acquire()  # free: returns at once, no timer needed
        try:
            connection = self._idle_connection(host, port)
            if connection is None:
                connection = await self._connect(loop, host, port, deadline)
            response = await connection.exchange(
                request, self._send_timeout, self._read_timeout, deadline
            )
            if body and response.status >= 400:
                # A gateway refuses on the head alone (401, a missing header) and may leave
                # the body unread in its buffers, where it would pass for the next request.
                # Whether it read the body cannot be seen from here: start afresh.
                connection.close()
            if not connection.closed:
                self._idle.setdefault((host, port), []).append(connection)
            return response
        finally:
            self._slots.release()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """A slot within the pool timeout; a request past its deadline never gets one."""
        if loop.time() >= deadline:
            raise Timeout("request_deadline")
        until = _limit(loop, self._pool_timeout, "pool_wait", deadline)
        try:
            async with asyncio.timeout_at(until.at):
                await self._slots.acquire()
        except TimeoutError:
            raise Timeout(until.phase) from None

    def _idle_connection(self, host: str, port: int) -> _Connection | None:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.closed or now - connection.idle_since > self._keepalive_timeout:
                connection.close()
                continue
            return connection
        return None

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, deadline: float
    ) -> _Connection:
        until = _limit(loop, self._connect_timeout, "upstream_connect", deadline)
        try:
            async with asyncio.timeout_at(until.at):
                return await _Connection.open(host, port, self._context)
        except ssl.SSLCertVerificationError:
            raise
        except TimeoutError:
            raise Timeout(until.phase) from None
        except OSError as exc:  # ssl.SSLError included
            raise ConnectionFailed(type(exc).__name__) from None


def serialise_headers(method: str, host: str, headers: CIMultiDict[str], body: bytes) -> bytes:
    """The header block: Host, the given headers, Content-Length; values as aiohttp read them."""
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.insert(0, f"Host: {host}\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    # aiohttp decodes header bytes as UTF-8 with surrogateescape; this restores them exactly.
    return "".join(lines).encode("utf-8", "surrogateescape")
