"""The terminal-facing HTTP/1.1 server: parse requests, hand each to the pipeline, frame replies.

Why not aiohttp's web server: under load its per-request machinery (request and response
objects, the stream writer, the task per request) cost as much CPU as the whole proxy
pipeline, and the proxy uses none of its generality. Why httptools rather than aiohttp's
request parser: both run llhttp, but aiohttp's parser needs a protocol implementing its
StreamReader flow-control contract, cannot show request trailers (and carries the last
trailer over into the next request's headers); httptools gives llhttp's own strict
callbacks through a public API, the same one :mod:`proxy.http1` parses MobilePay's
responses with. It is used as it comes: no leniency is ever switched on.

What this server promises:

- requests on a connection are answered in order, pipelined ones included. Bytes go to
  the parser in slices too short to complete more requests than the queue has room for
  (``MAX_QUEUED``); the rest waits unparsed and reading pauses until the queue drains;
- every refusal is the proxy's JSON error, recorded by the pipeline
  (:meth:`Handler.refuse`); a request the parser refuses is answered after the ones before
  it, and the connection is closed. Request trailers are refused: bodies are forwarded
  with a Content-Length, so a trailer has nowhere to go, and must never reach the next
  request;
- deadlines: the first request's head within ``header_timeout_seconds`` of the connection,
  every later head within it of its first byte; an idle connection closes after
  ``keepalive_timeout_seconds``; an answer the terminal does not take within
  ``send_timeout_seconds`` aborts the connection, freeing what it held;
- answers are written head and body as they are; only a body under ``JOIN_BELOW`` bytes is
  joined to its head;
- bounds: ``MAX_QUEUED`` requests and one read of bytes per connection, ``BODY_BUFFER``
  body bytes before reading pauses, ``max_connections`` connections (beyond it, a 503);
- a body the pipeline did not read is discarded for up to ``LINGER_SECONDS`` so the
  connection can be kept; otherwise it is closed;
- a terminal that leaves mid-request does not cancel the request towards MobilePay: a
  payment call already sent completes, and only its answer is dropped;
- :meth:`EdgeServer.close` stops listening, closes idle connections, lets in-flight requests
  finish (their replies close the connection) and cuts off what is left after the timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import ServerConfig
from proxy.errors import (
    HeadersTooLarge,
    IncompleteBody,
    MalformedRequest,
    MethodNotAllowed,
    ProxyError,
    TooManyConnections,
)
from proxy.messages import Body, BodyBytes, Reply, Request, error_reply
from proxy.metrics import Metrics
from proxy.routing import ALLOWED_HEADER

log = logging.getLogger(__name__)


class Handler(Protocol):
    """The pipeline behind the edge."""

    def handle(self, request: Request) -> Awaitable[Reply]:
        """The answer to a parsed request."""

    def refuse(self, error: ProxyError, remote: str | None, method: str | None) -> Reply:
        """Record, and build the answer to, a request the edge refused itself."""


MAX_QUEUED = 16  # parsed requests waiting behind the one being answered
# The shortest request llhttp can complete, "GET / HTTP/1.0\r\n\r\n": n bytes complete at
# most 1 + (n - 1) // SHORTEST_REQUEST requests.
SHORTEST_REQUEST = 18
BODY_BUFFER = 2**16  # body bytes buffered before reading from the terminal pauses
LINGER_SECONDS = 1.0
# A body this small is joined to its head: copying it costs less than a second buffer in
# the transport (measured on uvloop: about 1.3 us per answer). Larger ones are not copied.
JOIN_BELOW = 16 * 1024
# aiohttp's list: headers whose repetition makes a request ambiguous.
SINGLETON_HEADERS = frozenset(
    {
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    }
)
# RFC 1945 8.3: an HTTP/1.0 request with a body must say how long it is.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class EdgeServer:
    """Listens for terminals and serves every connection with :class:`_Connection`."""

    def __init__(self, handler: Handler, config: ServerConfig, metrics: Metrics) -> None:
        self.handler = handler
        self.config = config
        self.metrics = metrics
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._all_closed: asyncio.Event | None = None

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._protocol, host, port, backlog=1024, reuse_port=reuse_port
        )
        self._servers.append(server)

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self._servers for sock in server.sockets or ()]

    async def close(self, drain_seconds: float) -> None:
        """Stop listening, then wait up to ``drain_seconds`` for in-flight requests to finish."""
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.close_when_idle()
        if self._connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), drain_seconds)
            except TimeoutError:
                log.warning(
                    "drain timeout: closing %d connection(s) with requests still in flight",
                    len(self._connections),
                )
            for connection in list(self._connections):
                connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _protocol(self) -> asyncio.Protocol:
        if len(self._connections) >= self.config.max_connections:
            return _Refused(self)
        return _Connection(self)

    def opened(self, connection: _Connection) -> None:
        self._connections.add(connection)
        self.metrics.terminal_connections.inc()

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self.metrics.terminal_connections.dec()
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()


class _Refused(asyncio.Protocol):
    """A connection beyond ``max_connections``: a 503, then closed without reading."""

    def __init__(self, server: EdgeServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        server.metrics.connections_refused.inc()
        reply = server.handler.refuse(TooManyConnections(retry_after=1), _peer(transport), None)
        head, body = _encoded(reply, keep_alive=False)
        transport.write(head + body)
        # Half-close and let the request the terminal is sending drain away, so that a
        # reset for unread bytes does not destroy the 503 before the terminal reads it.
        transport.write_eof()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


@dataclass(slots=True)
class _Refusal:
    """A request the edge refused before the pipeline could see it."""

    error: ProxyError
    method: str | None


class _Connection(asyncio.Protocol):
    """One terminal connection: httptools' callbacks below build the requests."""

    def __init__(self, server: EdgeServer) -> None:
        self._server = server
        self._handler = server.handler
        self._config = server.config
        self._metrics = server.metrics
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._queue: deque[Request | _Refusal] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # close once the queued requests are answered
        self._eof = False  # the terminal has finished sending
        # reading
        self._unfed: memoryview | None = None  # read, not yet parsed: waits for room
        self._stopped = False  # nothing more is parsed: later bytes are dropped
        self._reading_paused = False
        self._after_close = False  # the last request asked to close the connection
        # the message being parsed
        self._in_head = False
        self._line = 0  # bytes of the head line still without its end
        self._line_limit = max(self._config.max_line_size, self._config.max_field_size)
        self._method: str | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: Body | None = None
        self._length_left = 0  # of a Content-Length body
        self._keep_alive = True  # what the message being parsed asks for
        self._refusal: ProxyError | None = None  # raised from a callback
        self._heads = 0
        self._head_began = 0.0  # loop time of the first byte of the head being parsed
        # deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._timer_is_head = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._remote = _peer(transport)
        self._server.opened(self)
        self._head_began = self._loop.time()
        self._arm(self._config.header_timeout_seconds, head=True)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._timer is not None and not self._timer_is_head:
            self._disarm()
        if self._unfed is not None:  # only if the transport delivered after pause_reading
            self._unfed = memoryview(b"".join((self._unfed, data)))
        else:
            self._unfed = memoryview(data)
        self._feed()
        if not self._in_head and self._timer is None and self._idle():
            # Bytes that began no request (blank lines): the connection is still idle.
            self._arm(self._config.keepalive_timeout_seconds, head=False)

    def eof_received(self) -> bool:
        # The terminal has finished sending; answer what it sent, then close.
        self._eof = True
        self._closing = True
        self._end_of_input()
        if self._idle():
            self._close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._disarm()
        self._stopped = True
        self._closing = True
        self._unfed = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._body is not None:
            self._body.fail(IncompleteBody())
            self._body = None
        self._wake_writer()
        self._server.closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(
                self._config.send_timeout_seconds, self._send_overdue
            )

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._wake_writer()

    # used by EdgeServer

    def close_when_idle(self) -> None:
        self._closing = True
        if self._task is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # feeding the parser

    def _feed(self) -> None:
        """Parse what was read, as far as the queue and the body buffer have room."""
        unfed = self._unfed
        parser = self._parser
        while unfed is not None and not self._stopped:
            size = self._room()
            if size == 0:
                break
            if len(unfed) <= size:
                chunk, unfed = unfed, None
            else:
                chunk, unfed = unfed[:size], unfed[size:]
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                # The upgrade request is queued; the pipeline refuses it. Nothing after it
                # is HTTP.
                self._stop()
                unfed = None
            except httptools.HttpParserError as exc:
                unfed = None
                self._parse_failed(exc)
            else:
                if self._in_head:
                    self._check_line(chunk)
        self._unfed = None if self._stopped else unfed
        transport = self._transport
        if transport is None:
            return
        if self._unfed is not None:
            if not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
            if self._timer_is_head:
                # The rest of this head is here, waiting for room: not the terminal's delay.
                self._disarm()
                self._head_began = self._loop.time()
        else:
            if self._reading_paused and not transport.is_closing():
                self._reading_paused = False
                transport.resume_reading()
            if self._in_head and self._timer is None:
                # Armed only for a head still incomplete after a read: most come whole.
                due = self._head_began + self._config.header_timeout_seconds
                self._arm(max(0.0, due - self._loop.time()), head=True)
            self._end_of_input()

    def _room(self) -> int:
        """How many bytes the parser may be given now (0: wait)."""
        body = self._body
        if body is not None and body.buffered >= BODY_BUFFER:
            return 0
        if self._length_left:
            return self._length_left  # body bytes only: no request can end among them
        free = MAX_QUEUED - len(self._queue)
        return SHORTEST_REQUEST * (free - 1) + 1 if free > 0 else 0

    def _check_line(self, chunk: memoryview) -> None:
        # llhttp holds an unfinished header line whole: bound it before it ends.
        end = bytes(chunk).rfind(b"\n")
        self._line = self._line + len(chunk) if end < 0 else len(chunk) - end - 1
        if self._line > self._line_limit:
            self._refused(HeadersTooLarge())

    def _resume(self) -> None:
        """Room again (a request left the queue, the pipeline took body bytes)."""
        if self._unfed is not None and self._room():
            self._feed()

    def _end_of_input(self) -> None:
        if self._eof and self._unfed is None and self._body is not None:
            self._body.fail(IncompleteBody())
            self._body = None

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None and self._after_close:
            # Bytes after a request that closes the connection: never processed (RFC 9112 9.6).
            self._stop()
            return
        if refusal is None:
            if isinstance(exc, httptools.HttpParserInvalidMethodError):
                refusal = MethodNotAllowed(allowed=ALLOWED_HEADER)
            elif self._body is not None:
                refusal = MalformedRequest("The request body's chunked framing is not valid.")
            else:
                refusal = MalformedRequest()
        self._refused(refusal)

    def _refused(self, error: ProxyError) -> None:
        """Answer a request the edge refuses after the ones before it, then close."""
        self._stop()
        body = self._body
        if body is not None:
            # The request is queued already: its body read fails, which answers it.
            body.fail(error)
            self._body = None
        else:
            self._queue.append(_Refusal(error, self._method))
            self._start()

    def _stop(self) -> None:
        """Parse nothing more; the requests already queued are still answered."""
        self._stopped = True
        self._unfed = None
        self._in_head = False
        if self._timer_is_head:
            self._disarm()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._method = None
        self._url = []
        self._url_size = 0
        self._headers = CIMultiDict()
        self._heads += 1
        if self._heads > 1:
            # Every head after the first is due within the header timeout of its first byte
            # (the first, within it of the connection's start).
            self._head_began = self._loop.time()

    def on_url(self, url: bytes) -> None:
        if self._method is None:
            self._method = self._parser.get_method().decode("ascii")
        self._url.append(url)
        self._url_size += len(url)
        if self._url_size > self._config.max_line_size:
            raise self._refuse(HeadersTooLarge())

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            raise self._refuse(MalformedRequest("Request trailers are not accepted."))
        config = self._config
        if len(name) + len(value) + 2 > config.max_field_size:
            raise self._refuse(HeadersTooLarge())
        headers = self._headers
        if len(headers) >= config.max_headers:
            raise self._refuse(MalformedRequest("The request has too many headers."))
        key = name.decode("latin-1")
        if key in headers and key.lower() in SINGLETON_HEADERS:
            raise self._refuse(MalformedRequest(f"The request has more than one {key} header."))
        # As aiohttp decodes header values, so that proxy.http1 restores the same bytes.
        headers.add(key, value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._line = 0
        if self._timer_is_head:
            self._disarm()
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise self._refuse(MalformedRequest("Only HTTP/1.0 and HTTP/1.1 are spoken here."))
        headers = CIMultiDictProxy(self._headers)
        method = self._method or parser.get_method().decode("ascii")
        if version == (1, 1) and "Host" not in headers:
            raise self._refuse(MalformedRequest("An HTTP/1.1 request needs a Host header."))
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise self._refuse(MalformedRequest("The only transfer coding accepted is chunked."))
        length = headers.get("Content-Length")
        if version == (1, 0) and length is None and coding is None and method in _BODY_METHODS:
            raise self._refuse(
                MalformedRequest("An HTTP/1.0 request with a body needs a Content-Length.")
            )
        upgrade = parser.should_upgrade()
        body = None
        if not upgrade and (coding is not None or (length is not None and int(length) > 0)):
            body = self._body = Body(self._resume)
            self._length_left = 0 if coding is not None else int(length or 0)
        target = b"".join(self._url).decode("utf-8", "surrogateescape")
        keep_alive = self._keep_alive = parser.should_keep_alive() and not upgrade
        request = Request(
            method,
            target,
            version,
            headers,
            self._remote,
            body,
            self._continue,
            keep_alive=keep_alive,
        )
        self._queue.append(request)
        self._start()

    def on_body(self, data: bytes) -> None:
        if self._length_left:
            self._length_left -= len(data)
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.finish()
            self._body = None
        self._length_left = 0
        if not self._keep_alive:
            self._after_close = True
            self._stopped = True
            self._closing = True

    def _refuse(self, error: ProxyError) -> ProxyError:
        """Remember why a callback stops the parser (httptools wraps what it raises)."""
        self._refusal = error
        return error

    # serving

    def _start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    def _idle(self) -> bool:
        return self._task is None and not self._queue

    async def _serve(self) -> None:
        try:
            while self._queue:
                item = self._queue.popleft()
                self._resume()
                if isinstance(item, _Refusal):
                    reply = self._handler.refuse(item.error, self._remote, item.method)
                    version, keep = (1, 1), False
                else:
                    reply, keep = await self._answer(item)
                    version = item.version
                if not self._send(reply, version, keep):
                    return  # the terminal left; its answer has nobody to go to
                if keep and isinstance(item, Request) and item.body_pending:
                    keep = await self._discard(item)
                if not keep:
                    self._close()
                    return
                if self._write_paused:
                    if not await self._drain():
                        return
                elif self._queue:
                    await asyncio.sleep(0)  # other connections' turn between answers
            if self._closing:
                self._close()
            elif not self._in_head and self._transport is not None:
                self._arm(self._config.keepalive_timeout_seconds, head=False)
        except Exception:
            log.exception("error answering a request from %s", self._remote)
            self._close()
        finally:
            self._task = None

    async def _answer(self, request: Request) -> tuple[Reply, bool]:
        """The reply, and whether the connection may stay open after it."""
        keep = request.keep_alive
        try:
            reply = await self._handler.handle(request)
        except Exception:
            log.exception("error handling a request from %s", self._remote)
            reply = error_reply(ProxyError())
            keep = False
        if request.body_timed_out:
            self._metrics.timeouts.labels("request_body").inc()
        if request.body_pending and request.awaits_continue:
            # Refused before the 100: the terminal will not send the body, so the next
            # bytes could not be told apart from it (RFC 9110 10.1.1). Close instead.
            keep = False
        keep = keep and not reply.close and not self._closing
        return reply, keep and self._config.keepalive_timeout_seconds > 0

    def _send(self, reply: Reply, version: tuple[int, int], keep: bool) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        head, body = _encoded(reply, keep_alive=keep, version=version)
        if len(body) <= JOIN_BELOW:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        return True

    async def _discard(self, request: Request) -> bool:
        """Read and drop the rest of an unread body; True if it ended, as framed, in time."""
        body = request.body
        assert body is not None
        body.discard()
        self._resume()
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await body.wait()
        except TimeoutError:
            return False
        return body.complete

    async def _drain(self) -> bool:
        """Wait until the terminal has taken enough of its answers; False if it is gone."""
        while self._write_paused and self._transport is not None:
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        return self._transport is not None and not self._transport.is_closing()

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _continue(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._closing:
            transport.write(_CONTINUE)

    # deadlines

    def _arm(self, seconds: float, *, head: bool) -> None:
        self._disarm()
        self._timer_is_head = head
        self._timer = self._loop.call_later(seconds, self._overdue)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_is_head = False

    def _overdue(self) -> None:
        head = self._timer_is_head
        self._timer = None
        self._timer_is_head = False
        if head:
            self._metrics.timeouts.labels("request_head").inc()
            log.info(
                "closed a connection from %s whose request head did not arrive within %.1f s",
                self._remote,
                self._config.header_timeout_seconds,
            )
            self._stop()
        self._closing = True  # answer what was asked, then close
        if self._idle():
            self._close()

    def _send_overdue(self) -> None:
        self._send_timer = None
        self._metrics.timeouts.labels("response_send").inc()
        log.warning(
            "aborted a connection from %s that took none of its answer for %.1f s",
            self._remote,
            self._config.send_timeout_seconds,
        )
        self.abort()

    def _close(self) -> None:
        self._closing = True
        self._disarm()
        if self._transport is not None:
            self._transport.close()


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else None


def _encoded(
    reply: Reply, *, keep_alive: bool, version: tuple[int, int] = (1, 1)
) -> tuple[bytes, BodyBytes]:
    """The reply's head, and its body as it is.

    Relayed header lines pass through as the upstream sent them; the proxy's own are latin-1.
    """
    status = reply.status
    body = reply.body
    headers = reply.headers
    relayed = reply.relayed
    # HTTP/1.1 even to an HTTP/1.0 terminal: the highest version the proxy speaks (RFC 9110 2.5).
    start = f"HTTP/1.1 {status} {reply.reason or _REASONS.get(status, '')}\r\n"
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    if (relayed is None or not relayed.dated) and "Date" not in headers:
        lines.append(_date_line(int(time.time())))
    if status >= 200 and status not in (204, 304):
        size = body.nbytes if isinstance(body, memoryview) else len(body)
        lines.append(f"Content-Length: {size}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version < (1, 1):
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    if relayed is None:
        return (start + "".join(lines)).encode("latin-1"), body
    head = b"".join((start.encode("latin-1"), relayed.lines, "".join(lines).encode("latin-1")))
    return head, body


@functools.lru_cache(maxsize=1)
def _date_line(second: int) -> str:
    return f"Date: {formatdate(second, usegmt=True)}\r\n"
