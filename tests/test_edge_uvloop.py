"""The terminal edge on uvloop, the loop the proxy runs on when it is installed.

The other tests run on asyncio's own loop; uvloop's transports are different classes with
the same methods, so the edge is served here once on uvloop, over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from proxy.config import ServerConfig
from proxy.edge import EdgeServer
from proxy.errors import ProxyError
from proxy.messages import Reply, Request, error_reply
from proxy.metrics import Metrics


class Echo:
    """A pipeline that answers each request with its target, and refuses as the proxy does."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    async def handle(self, request: Request) -> Reply:
        body = await request.read_body(1000, 1.0)
        return Reply(200, body=request.target.encode() + b" " + body)

    def refuse(self, error: ProxyError, remote: str | None, method: str | None) -> Reply:
        self.refused.append(error.code)
        return error_reply(error)


async def _exchange(data: bytes) -> tuple[bytes, list[str]]:
    handler = Echo()
    edge = EdgeServer(handler, ServerConfig(), Metrics(CollectorRegistry()))
    await edge.listen("127.0.0.1", 0)
    port = edge.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answers = await asyncio.wait_for(reader.read(), 5)  # the proxy closes after the 400
    writer.close()
    await edge.close(1)
    return answers, handler.refused


@pytest.mark.timeout(20)
def test_the_edge_serves_pipelined_requests_and_refusals_on_uvloop() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /c HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        answers, refused = runner.run(asyncio.wait_for(_exchange(data), 10))
    bodies = re.findall(rb"\r\n\r\n([^\r]*?)(?=HTTP/1\.1 |$)", answers)
    assert bodies[:2] == [b"/a ", b"/b {}"]
    assert json.loads(bodies[2])["code"] == "malformed_request"
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"200", b"200", b"400"]
    assert refused == ["malformed_request"]
