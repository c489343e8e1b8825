"""What the terminal-facing edge hands the pipeline, and what the pipeline hands back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp.streams import EmptyStreamReader, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import (
    ERROR_HEADER,
    BodyTooLarge,
    IncompleteBody,
    MalformedRequest,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
)
from proxy.request_ids import REQUEST_ID_HEADER, new_request_id


class BrokenBody(Exception):
    """The parser found the request body's framing invalid (set on the body stream)."""


@dataclass(slots=True)
class Reply:
    """A whole response for the terminal; the edge frames it (Content-Length, Date, Connection)."""

    status: int
    reason: str = ""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    close: bool = False  # end the connection after this reply


def error_reply(error: ProxyError, request_id: str | None = None) -> Reply:
    """The proxy's JSON error answer, shaped like MobilePay's ``ErrorResponse``.

    ``{"code": code, "message": sentence, "correlationId": request id}``; a refusal that
    comes before a request id was chosen (the parser's) gets a new one.
    """
    if request_id is None:
        request_id = new_request_id()
    body = json.dumps(
        {"code": error.code, "message": error.message, "correlationId": request_id}
    ).encode()
    headers = CIMultiDict(
        {
            "Content-Type": "application/json",
            ERROR_HEADER: error.code,
            REQUEST_ID_HEADER: request_id,
        }
    )
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allowed
    return Reply(error.status, headers=headers, body=body, close=error.closes_connection)


class Request:
    """One parsed terminal request: the head as the parser read it and a body not yet read."""

    __slots__ = (
        "_body",
        "_continued",
        "_send_continue",
        "headers",
        "method",
        "remote",
        "target",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        remote: str | None,
        body: StreamReader,
        send_continue: Callable[[], None],
    ) -> None:
        self.method = method
        self.target = target  # the raw request target, exactly as sent
        self.version = version
        self.headers = headers
        self.remote = remote
        self._body = body
        self._send_continue = send_continue
        self._continued = False

    @property
    def has_body(self) -> bool:
        return not isinstance(self._body, EmptyStreamReader)

    @property
    def awaits_continue(self) -> bool:
        """Whether the terminal still waits for a 100 Continue: its body may never come."""
        return not self._continued and self.headers.get("Expect", "").lower() == "100-continue"

    async def read_body(self, max_bytes: int, seconds: float) -> bytes:
        """The whole body, within the size limit and the time limit."""
        if not self.has_body:
            return b""
        declared = self.headers.get("Content-Length")
        if declared is not None and int(declared) > max_bytes:
            raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
        if self.awaits_continue:
            # The terminal waits for this before sending the body; refusals above come first.
            self._send_continue()
            self._continued = True
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(seconds):
                async for chunk in self._body.iter_any():
                    size += len(chunk)
                    if size > max_bytes:
                        raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout() from None
        except BrokenBody:
            raise MalformedRequest("The request body's chunked framing is not valid.") from None
        except ConnectionError:
            raise IncompleteBody() from None
        return b"".join(chunks)
