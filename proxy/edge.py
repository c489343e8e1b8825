"""The terminal-facing HTTP/1.1 server: parse requests, hand each to the pipeline, frame replies.

Why not aiohttp's web server: under load its per-request machinery (request and response
objects, the stream writer, the task per request) cost as much CPU as the whole proxy
pipeline, and the proxy uses none of its generality (routing, middleware, streaming
responses, websockets). This server keeps aiohttp's strict C request parser (llhttp), so
it accepts and refuses exactly what aiohttp's server would, and does the rest in one small
protocol:

- requests on a connection are answered in order, pipelined ones included; at most
  ``MAX_QUEUED`` parsed requests wait, then reading pauses;
- every refusal is the proxy's JSON error (:func:`proxy.messages.error_reply`); a request
  the parser refuses is answered after the ones before it, and the connection is closed;
- the first request's head must arrive within ``header_timeout_seconds`` (slow-header
  clients are cut off), an idle keep-alive connection is closed after
  ``keepalive_timeout_seconds``, and the next head must arrive within the header timeout
  once it has started;
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
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from proxy.config import ServerConfig
from proxy.errors import (
    HeadersTooLarge,
    MalformedRequest,
    MethodNotAllowed,
    ProxyError,
)
from proxy.messages import BrokenBody, Reply, Request, error_reply
from proxy.routing import ALLOWED_HEADER

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Reply]]

MAX_QUEUED = 16  # parsed requests waiting behind the one being answered
LINGER_SECONDS = 1.0
READ_LIMIT = 2**16  # body bytes buffered before reading from the socket pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class EdgeServer:
    """Listens for terminals and serves every connection with :class:`_Connection`."""

    def __init__(self, handler: Handler, config: ServerConfig) -> None:
        self.handler = handler
        self.config = config
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._all_closed: asyncio.Event | None = None

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_port=reuse_port
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

    def opened(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()


class _Connection(BaseProtocol):
    def __init__(self, server: EdgeServer) -> None:
        loop = asyncio.get_running_loop()
        config = server.config
        parser = HttpRequestParser(
            self,
            loop,
            READ_LIMIT,
            max_line_size=config.max_line_size,
            max_field_size=config.max_field_size,
            max_headers=config.max_headers,
            payload_exception=BrokenBody,
            # A compressed body is relayed as it came, with its Content-Encoding.
            auto_decompress=False,
        )
        super().__init__(loop, parser)
        self._request_parser = parser
        self._server = server
        self._queue: deque[tuple[RawRequestMessage | ProxyError, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._last_body: StreamReader = EMPTY_PAYLOAD
        self._remote: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._idle = False  # between requests, no byte of the next one yet
        self._answered = 0
        self._stopped_reading = False  # after a refusal or an upgrade: later bytes are ignored
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        self._server.opened(self)
        self._arm(self._server.config.header_timeout_seconds)

    def data_received(self, data: bytes) -> None:
        if self._stopped_reading or self.transport is None:
            return
        try:
            messages, upgraded, _ = self._request_parser.feed_data(data)
        except HttpProcessingError as exc:
            self._refuse(exc)
            return
        if messages:
            self._disarm()
            self._idle = False
            for message, body in messages:
                self._queue.append((message, body))
                self._last_body = body
            if upgraded:
                # The parser reads nothing after an upgrade request; it gets a refusal.
                self._stopped_reading = True
            if len(self._queue) >= MAX_QUEUED:
                self._pause_reading_for_buffer()
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
        elif self._idle and data:
            # The next request has started: its head is due within the header timeout.
            self._idle = False
            self._arm(self._server.config.header_timeout_seconds)

    def eof_received(self) -> bool:
        # The terminal has finished sending; answer what it sent, then close.
        self._closing = True
        if not self._last_body.is_eof():
            self._last_body.set_exception(ConnectionResetError("the terminal stopped sending"))
        if self._task is None:
            self._close_transport()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._disarm()
        self._stopped_reading = True
        self._closing = True
        if not self._last_body.is_eof():
            self._last_body.set_exception(ConnectionResetError("the terminal disconnected"))
        self._server.closed(self)

    # used by EdgeServer

    def close_when_idle(self) -> None:
        self._closing = True
        if self._task is None:
            self._close_transport()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # serving

    async def _serve(self) -> None:
        try:
            while self._queue:
                item, body = self._queue.popleft()
                if self._buffer_paused and len(self._queue) <= MAX_QUEUED // 2:
                    self._resume_reading_for_buffer()
                reply, version, keep = await self._answer(item, body)
                transport = self.transport
                if transport is None:
                    return  # the terminal left; its answer has nobody to go to
                keep = keep and not reply.close and not self._closing
                transport.write(_encode(reply, version, keep_alive=keep))
                self._answered += 1
                if keep and not body.is_eof():
                    keep = await _discard(body)
                if not keep:
                    self._close_transport()
                    return
                if self._paused:
                    await self._drain_helper()
            if self._closing:
                self._close_transport()
            else:
                self._idle = True
                self._arm(self._server.config.keepalive_timeout_seconds)
        except ConnectionError:
            self._close_transport()
        except Exception:
            log.exception("error answering a request from %s", self._remote)
            self._close_transport()
        finally:
            self._task = None

    async def _answer(
        self, item: RawRequestMessage | ProxyError, body: StreamReader
    ) -> tuple[Reply, tuple[int, int], bool]:
        """The reply, the HTTP version to answer in, and whether the connection may stay."""
        if isinstance(item, ProxyError):
            return error_reply(item), (1, 1), False
        version = (item.version.major, item.version.minor)
        keep = not item.should_close and not item.upgrade
        request = Request(
            item.method, item.path, version, item.headers, self._remote, body, self._continue
        )
        try:
            reply = await self._server.handler(request)
        except Exception:
            log.exception("error handling a request from %s", self._remote)
            reply = error_reply(ProxyError())
            keep = False
        if not body.is_eof() and request.awaits_continue:
            # Refused before the 100: the terminal will not send the body, so the next
            # bytes could not be told apart from it (RFC 9110 10.1.1). Close instead.
            keep = False
        return reply, version, keep and self._server.config.keepalive_timeout_seconds > 0

    def _continue(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(_CONTINUE)

    def _refuse(self, exc: HttpProcessingError) -> None:
        """Answer a request the parser refused after the ones before it, then close."""
        self._disarm()
        self._stopped_reading = True
        if not self._last_body.is_eof():
            self._last_body.set_exception(BrokenBody())
        error: ProxyError
        if isinstance(exc, BadHttpMethod):
            error = MethodNotAllowed(allowed=ALLOWED_HEADER)
        elif isinstance(exc, LineTooLong):
            error = HeadersTooLarge()
        else:
            error = MalformedRequest()
        # Only the class: the parser's message quotes the bytes, which may carry credentials.
        log.warning("refused a malformed request from %s: %s", self._remote, type(exc).__name__)
        self._queue.append((error, EMPTY_PAYLOAD))
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    # deadlines

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(seconds, self._overdue)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        if self._task is not None:
            return
        if self._answered == 0:
            log.info(
                "closed a connection that sent no complete request within %.0f s",
                self._server.config.header_timeout_seconds,
            )
        self._close_transport()

    def _close_transport(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


async def _discard(body: StreamReader) -> bool:
    """Read and drop the rest of an unread body; True if it ended in time."""
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while not body.is_eof():
                await body.readany()
    except (TimeoutError, BrokenBody, ConnectionError):
        return False
    return True


def _encode(reply: Reply, version: tuple[int, int], *, keep_alive: bool) -> bytes:
    """The reply's bytes; header values pass through as the upstream sent them (latin-1)."""
    status = reply.status
    # HTTP/1.1 even to an HTTP/1.0 terminal: the highest version the proxy speaks (RFC 9110 2.5).
    lines = [f"HTTP/1.1 {status} {reply.reason or _REASONS.get(status, '')}\r\n"]
    headers = reply.headers
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    if "Date" not in headers:
        lines.append(_date_line(int(time.time())))
    if status >= 200 and status not in (204, 304):
        lines.append(f"Content-Length: {len(reply.body)}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version < (1, 1):
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + reply.body


@functools.lru_cache(maxsize=1)
def _date_line(second: int) -> str:
    return f"Date: {formatdate(second, usegmt=True)}\r\n"
