"""Addresses servers report once they listen: every server under test binds port 0."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import aiohttp
from yarl import URL

# "127.0.0.1:8080" or "[::1]:8080", as the proxy and Prometheus log what they bound.
ADDRESS = r"(?:\[[0-9a-fA-F:]+\]|[\w.-]+):\d+"


def http_url(address: str) -> str:
    """``http://`` plus an address as a server logged it."""
    return f"http://{address}"


def host_port(url: str) -> tuple[str, int]:
    parsed = URL(url)
    assert parsed.host is not None, url
    assert parsed.port is not None, url
    return parsed.host, parsed.port


def unused_port() -> int:
    """A port free at this moment, for a server that cannot bind port 0 and say which it got.

    redis-server needs one (its caller retries with another port when the server reports
    the port taken), and so does the compose stack run natively (tests/test_stack.py),
    whose services are told each other's addresses before any of them starts, as Compose
    tells them names; there a taken port fails the start-up, loudly.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound and never listening: every connect to it is refused, and no
    other test can take it while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


async def refuses_connections(url: str) -> bool:
    """Whether nothing accepts a connection at ``url`` any more (a server stopped listening)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/"):
            return False
    except aiohttp.ClientConnectionError:
        return True
