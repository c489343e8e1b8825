"""The HTTP/1.1 edge: requests aiohttp's parser refuses still get a JSON error.

aiohttp answers a request it cannot parse (bad framing, an unknown method, an
over-long line) from its connection handler, before any application code runs,
with a plain-text body that quotes the offending bytes and a log line that does
the same. Those bytes may carry a terminal's forged credential header, so the
handler is replaced by one that answers with the proxy's JSON error and logs
only the error's class.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.errors import ERROR_HEADER
from proxy.forwarding import ALLOWED_HEADER

log = logging.getLogger(__name__)


class _JsonErrorHandler(RequestHandler):
    header_timeout = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp has no deadline for the first request's headers; without one a client
        # trickling a header byte at a time holds the connection until keep-alive expires.
        self._header_deadline = self._loop.call_later(self.header_timeout, self._headers_due)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._header_deadline.cancel()
        super().connection_lost(exc)

    def _headers_due(self) -> None:
        if self._request_count == 0:
            log.info(
                "closed a connection that sent no complete request within %.0f s",
                self.header_timeout,
            )
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if isinstance(exc, BadHttpMethod):
            status, code, text = 405, "method_not_allowed", "The method is not supported."
        elif isinstance(exc, LineTooLong):
            status, code, text = (
                431,
                "headers_too_large",
                "The request line or a header is too long.",
            )
        elif status < 500:
            code, text = "malformed_request", "The request is not valid HTTP/1.1."
        else:
            code, text = "internal_error", "The proxy failed to handle the request."
        if status >= 500:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            log.warning(
                "refused a malformed request from %s: %s",
                request.remote,
                type(exc).__name__ if exc else status,
            )
        body = json.dumps({"error": code, "message": text}).encode()
        response = web.Response(status=status, body=body, content_type="application/json")
        response.headers[ERROR_HEADER] = code
        if status == 405:
            response.headers["Allow"] = ALLOWED_HEADER
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    header_timeout = 10.0

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        return handler


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections answer parse errors with the proxy's JSON errors
    and are closed when the first request's headers do not arrive within ``header_timeout``.

    With ``handler``, every request goes straight to it instead of the app's router.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._handler = handler

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = dict(server._kwargs)
        json_server = _JsonErrorServer(
            # Every request goes to one handler: calling it directly skips the router and
            # the middleware chain, which the proxy does not need (measured: ~5% CPU).
            self._handler or server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )
        json_server.header_timeout = self._header_timeout
        return json_server
