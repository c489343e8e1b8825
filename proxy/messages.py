"""What the terminal-facing edge hands the pipeline, and what the pipeline hands back."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import (
    ERROR_HEADER,
    BodyTooLarge,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
)
from proxy.headers import RelayedHead
from proxy.request_ids import REQUEST_ID_HEADER, new_request_id

# Any bytes-like object the transport can send without copying it first.
BodyBytes = bytes | bytearray | memoryview


@dataclass(slots=True)
class Reply:
    """A whole response for the terminal; the edge frames it (Content-Length, Date, Connection)."""

    status: int
    reason: str = ""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: BodyBytes = b""  # an upstream body as it arrived, never copied
    close: bool = False  # end the connection after this reply
    relayed: RelayedHead | None = None  # MobilePay's header lines, written before ``headers``


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


class Body:
    """A request body as the edge receives it, handed to the pipeline piece by piece.

    The edge feeds it and stops reading from the terminal while ``buffered`` is above its
    bound; every piece the pipeline takes calls ``consumed`` so the edge can read on.
    """

    __slots__ = ("_chunks", "_consumed", "_discarding", "_done", "_error", "_waiter", "buffered")

    def __init__(self, consumed: Callable[[], None]) -> None:
        self._chunks: deque[bytes] = deque()
        self._consumed = consumed
        self._discarding = False
        self._done = False
        self._error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.buffered = 0

    # the edge's side

    @property
    def done(self) -> bool:
        """Whether the body has ended, whole or not."""
        return self._done

    @property
    def complete(self) -> bool:
        """Whether the body ended as framed: the next bytes are the next request."""
        return self._done and self._error is None

    def feed(self, data: bytes) -> None:
        if not self._discarding:
            self._chunks.append(data)
            self.buffered += len(data)
            self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: ProxyError) -> None:
        """The body cannot be completed; the pipeline's next read raises ``error``."""
        if not self._done:
            self._error = error
            self._done = True
            self._wake()

    def discard(self) -> None:
        """Drop what is buffered and whatever else arrives."""
        self._discarding = True
        self._chunks.clear()
        self.buffered = 0

    async def wait(self) -> None:
        while not self._done:
            await self._wait()

    # the pipeline's side

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` once it has ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        self._consumed()
        return chunk

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One parsed terminal request: the head as the parser read it and a body not yet read."""

    __slots__ = (
        "_body",
        "_continued",
        "_send_continue",
        "body_timed_out",
        "headers",
        "keep_alive",
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
        body: Body | None,
        send_continue: Callable[[], None],
        *,
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target  # the raw request target, exactly as sent
        self.version = version
        self.headers = headers
        self.remote = remote
        self.keep_alive = keep_alive  # what the terminal asked for
        self.body_timed_out = False  # set when read_body gave up waiting
        self._body = body
        self._send_continue = send_continue
        self._continued = False

    @property
    def has_body(self) -> bool:
        return self._body is not None

    @property
    def body_pending(self) -> bool:
        """Whether part of the body is still to come (unread, or not yet sent)."""
        return self._body is not None and not self._body.complete

    @property
    def body(self) -> Body | None:
        return self._body

    @property
    def awaits_continue(self) -> bool:
        """Whether the terminal still waits for a 100 Continue: its body may never come.

        An HTTP/1.0 client cannot expect one (RFC 9110 10.1.1): its expectation is ignored.
        """
        return (
            not self._continued
            and self.version >= (1, 1)
            and self.headers.get("Expect", "").lower() == "100-continue"
        )

    async def read_body(self, max_bytes: int, seconds: float) -> bytes:
        """The whole body, within the size limit and the time limit.

        Raises what the edge found wrong with the body's framing (``MalformedRequest``) or
        ``IncompleteBody`` when the terminal stopped sending.
        """
        body = self._body
        if body is None:
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
                while chunk := await body.read():
                    size += len(chunk)
                    if size > max_bytes:
                        raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            self.body_timed_out = True
            raise RequestTimeout() from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
