"""A raw HTTP/1.1 client: exact bytes out, responses read exactly as they came over the wire.

For requests no ordinary client would build, and for watching what the proxy does with a
connection (keeps it, closes it, sends nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from tests.helpers.exposure import Exposure
from tests.helpers.ports import host_port


@dataclass
class Answer:
    """One response exactly as it came over the wire."""

    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def connection_options(self) -> set[str]:
        return {
            option.strip().lower()
            for value in self.all("connection")
            for option in value.split(",")
            if option.strip()
        }

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One terminal connection to the proxy, driven byte by byte."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exposure: Exposure | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._exposure = exposure

    @classmethod
    async def open(cls, url: str, exposure: Exposure | None = None) -> Connection:
        """A connection to ``http://host:port``; what comes back is shown to ``exposure``."""
        reader, writer = await asyncio.open_connection(*host_port(url))
        return cls(reader, writer, exposure)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def response(self, *, wait: float = 5.0, interim: bool = False) -> Answer:
        """The next response; interim (1xx) ones are skipped unless ``interim``."""
        async with asyncio.timeout(wait):
            while True:
                answer = await self._read_one()
                if interim or answer.status >= 200:
                    return answer

    async def closes(self, *, wait: float = 3.0) -> bool:
        """Whether the proxy ends the connection within ``wait`` without sending more."""
        try:
            async with asyncio.timeout(wait):
                extra = await self._reader.read(65536)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        assert extra == b"", f"unexpected bytes after the last response: {extra[:200]!r}"
        return True

    def finish_sending(self) -> None:
        self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _read_one(self) -> Answer:
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon, f"not a header line: {line!r}"
            headers.append((name, value.strip()))
        answer = Answer(version, int(status), headers, b"")
        if answer.status >= 200 and answer.status not in (204, 304):
            answer.body = await self._read_body(answer)
        if self._exposure is not None:
            self._exposure.texts.append(head.decode("latin-1"))
            self._exposure.texts.append(answer.body.decode(errors="replace"))
        return answer

    async def _read_body(self, answer: Answer) -> bytes:
        if answer.all("transfer-encoding"):
            assert answer.all("transfer-encoding") == ["chunked"]
            chunks: list[bytes] = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n\r\n")  # trailers, if any
                    return b"".join(chunks)
                chunks.append(await self._reader.readexactly(size))
                assert await self._reader.readexactly(2) == b"\r\n"
        lengths = answer.all("content-length")
        if lengths:
            return await self._reader.readexactly(int(lengths[0]))
        return await self._reader.read()  # delimited by the end of the connection


@dataclass
class RawResponse:
    """The first response on a connection, its headers by lower-case name."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw(
    url: str,
    data: bytes,
    *,
    wait: float = 5.0,
    expect_close: bool = False,
    exposure: Exposure | None = None,
) -> RawResponse:
    """Write ``data`` on a fresh connection and read the first response (closes after).

    With ``expect_close``, ``closed`` says whether the proxy then ended the connection.
    """
    connection = await Connection.open(url, exposure)
    try:
        await connection.send(data)
        answer = await connection.response(wait=wait)
        closed = await connection.closes(wait=wait) if expect_close else False
    finally:
        await connection.close()
    headers = {name.lower(): value for name, value in answer.headers}
    return RawResponse(answer.status, headers, answer.body, closed)


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
