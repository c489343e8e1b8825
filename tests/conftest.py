"""Fixtures: a test CA, fake MobilePay servers over TLS, and the proxy under test on loopback.

Every test also runs under a secrets guard: whatever the proxy logged, exported as a
metric or answered during the test must not contain a credential or an issued token.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import STATE, create_app, create_metrics_app, proxy_handler
from proxy.config import Config, parse_config
from proxy.edge import EdgeServer
from tests.fakes import (
    CLIENT_ID,
    CLIENT_SECRET,
    IBM_CLIENT_ID,
    PosServer,
    TokenServer,
    start_tls_server,
)
from tests.redis_server import RedisServer

MERCHANTS = {f"store-{n:03d}": f"DK{10000000 + n}" for n in range(1, 11)}
ROUTING_HEADER = "X-Merchant-Id"
SECRET_VALUES: set[str] = {
    CLIENT_SECRET,
    IBM_CLIENT_ID,
    base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode(),
}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Exposure:
    """Everything the proxy showed the outside world during one test."""

    logs: _Capture
    texts: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)

    def leaks(self) -> list[str]:
        secrets = SECRET_VALUES | self.tokens
        found = []
        for text in [*self.logs.lines, *self.texts]:
            found.extend(
                f"{secret[:6]}... in {text[:120]!r}" for secret in secrets if secret in text
            )
        return found


@pytest.fixture(autouse=True)
def exposure() -> Iterator[Exposure]:
    capture = _Capture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    exposed = Exposure(capture)
    try:
        yield exposed
    finally:
        root.removeHandler(capture)
        root.setLevel(previous)
    leaks = exposed.leaks()
    assert not leaks, f"secrets leaked: {leaks}"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
async def token_server(
    server_tls: ssl.SSLContext, exposure: Exposure
) -> AsyncIterator[TokenServer]:
    server = TokenServer()
    runner, port = await start_tls_server(server.handle, server_tls)
    server.url = f"https://127.0.0.1:{port}/integrator-authentication/connect/token"  # type: ignore[attr-defined]
    yield server
    exposure.tokens.update(server.issued)
    await runner.cleanup()


@pytest.fixture
async def pos_server(
    server_tls: ssl.SSLContext, token_server: TokenServer
) -> AsyncIterator[PosServer]:
    server = PosServer(tokens=token_server)
    runner, port = await start_tls_server(server.handle, server_tls)
    server.url = f"https://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield server
    await runner.cleanup()


def config_data(token_url: str, api_url: str, ca_file: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1", "metrics_port": 0},
        "mobilepay": {
            "api_base_url": api_url,
            "token_url": token_url,
            "ca_file": str(ca_file),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "ibm_client_id": IBM_CLIENT_ID,
        },
        "routing": {"merchants": dict(MERCHANTS)},
        "upstream": {"timeout_seconds": 5},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@dataclass
class RunningProxy:
    url: str
    metrics_url: str
    config: Config
    app: web.Application
    session: aiohttp.ClientSession
    exposure: Exposure
    registry: CollectorRegistry

    async def request(
        self, method: str, path: str, *, merchant: str | None = "store-001", **kwargs: Any
    ) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
        headers = dict(kwargs.pop("headers", {}))
        if merchant is not None:
            headers.setdefault(ROUTING_HEADER, merchant)
        async with self.session.request(
            method, self.url + path, headers=headers, allow_redirects=False, **kwargs
        ) as response:
            body = await response.read()
            self.exposure.texts.append(body.decode(errors="replace"))
            self.exposure.texts.append(str(response.headers))
            return response.status, response.headers, body

    async def metrics(self) -> str:
        async with self.session.get(self.metrics_url + "/metrics") as response:
            text = await response.text()
        self.exposure.texts.append(text)
        return text

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


ProxyFactory = Callable[..., "AsyncIterator[RunningProxy]"]


@pytest.fixture
async def start_proxy(
    token_server: TokenServer, pos_server: PosServer, ca_file: Path, exposure: Exposure
) -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []
    edges: list[EdgeServer] = []
    sessions: list[aiohttp.ClientSession] = []
    proxies: list[RunningProxy] = []

    async def start(**sections: Any) -> RunningProxy:
        data = config_data(
            token_server.url,
            pos_server.url,
            ca_file,
            **sections,  # type: ignore[attr-defined]
        )
        config = parse_config(data, base_dir=Path("."), environ={})
        registry = CollectorRegistry()
        app = create_app(config, registry=registry)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        edge = EdgeServer(proxy_handler(app), config.server, app[STATE].metrics)
        edges.append(edge)
        await edge.listen("127.0.0.1", 0)
        metrics_runner = web.AppRunner(create_metrics_app(app[STATE]), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, "127.0.0.1", 0).start()
        runners.append(metrics_runner)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        sessions.append(session)
        proxy = RunningProxy(
            url=f"http://127.0.0.1:{edge.addresses[0][1]}",
            metrics_url=f"http://127.0.0.1:{metrics_runner.addresses[0][1]}",
            config=config,
            app=app,
            session=session,
            exposure=exposure,
            registry=registry,
        )
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.metrics()
    for session in sessions:
        await session.close()
    for edge in edges:
        await edge.close(1)
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> RunningProxy:
    running: RunningProxy = await start_proxy()
    return running


@pytest.fixture
def redis_server(unused_tcp_port_factory: Callable[[], int]) -> Iterator[RedisServer]:
    server = RedisServer(unused_tcp_port_factory())
    server.start()
    try:
        yield server
    finally:
        server.stop()
