"""Addresses servers report once they listen: every server under test binds port 0."""

from __future__ import annotations

import socket

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

    Only redis-server needs one; its caller retries with another port when the server
    reports the port taken, so nothing depends on it staying free.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def refuses_connections(url: str) -> bool:
    """Whether nothing accepts a connection at ``url`` any more (a server stopped listening)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/"):
            return False
    except aiohttp.ClientConnectionError:
        return True
