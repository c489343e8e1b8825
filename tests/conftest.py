"""Fixtures: a test CA, fake MobilePay servers over TLS, and the proxy under test on loopback.

Every test runs with no ``MOBILEPAY_*`` variable in its environment, and under a secret
guard (tests/helpers/exposure.py): whatever the proxy logged, printed, exported as a metric
or answered during the test must not contain a credential or an issued token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.app import STATE
from proxy.config import Config, parse_config
from proxy.server import Serving, serve
from tests.fakes import PosServer, TokenServer, start_tls_server
from tests.helpers.configs import MERCHANTS, proxy_config
from tests.helpers.exposure import Exposure
from tests.helpers.processes import Processes
from tests.redis_server import RedisServer

__all__ = ["MERCHANTS", "Exposure", "RunningProxy"]

ROUTING_HEADER = "X-Merchant-Id"
# Read by the proxy (and prometheus_client) when set: a test must never see the operator's.
ENVIRONMENT_PREFIXES = ("MOBILEPAY_",)
ENVIRONMENT_NAMES = ("PROMETHEUS_MULTIPROC_DIR",)


@pytest.fixture(scope="session", autouse=True)
def empty_system_trust(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No system CA certificates: only a configured ``ca_file`` (the test CA) is trusted.

    Tests never depend on the machine's CA bundle, and the proxy does not parse it anew for
    every app it builds (about a tenth of a second each time).
    """
    empty = tmp_path_factory.mktemp("no-system-trust")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(empty / "none.pem"))
        patch.setenv("SSL_CERT_DIR", str(empty))
        yield


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENVIRONMENT_PREFIXES) or name in ENVIRONMENT_NAMES:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def exposure() -> Iterator[Exposure]:
    exposed = Exposure()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(exposed.logs)
    root.setLevel(logging.DEBUG)
    try:
        yield exposed
    finally:
        root.removeHandler(exposed.logs)
        root.setLevel(previous)
    exposed.check()


@pytest.fixture
async def processes(exposure: Exposure) -> AsyncIterator[Processes]:
    """Starts programs; stops what is left at the end of the test, before the guard looks."""
    started = Processes(exposure)
    try:
        yield started
    finally:
        await started.close()


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
    server.url = f"https://127.0.0.1:{port}/integrator-authentication/connect/token"
    yield server
    exposure.tokens.update(server.issued)
    await runner.cleanup()


@pytest.fixture
async def pos_server(
    server_tls: ssl.SSLContext, token_server: TokenServer
) -> AsyncIterator[PosServer]:
    server = PosServer(tokens=token_server)
    runner, port = await start_tls_server(server.handle, server_tls)
    server.url = f"https://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@dataclass
class RunningProxy:
    """The proxy as ``proxy.server.serve`` runs it, on this test's event loop."""

    url: str
    metrics_url: str
    config: Config
    app: web.Application
    session: aiohttp.ClientSession
    exposure: Exposure
    registry: CollectorRegistry
    _stop: asyncio.Event
    _served: asyncio.Task[None]

    @property
    def running(self) -> bool:
        return not self._served.done()

    async def stop(self) -> None:
        """What SIGTERM does: stop listening, drain, close; returns once ``serve`` has."""
        self._stop.set()
        await self._served

    async def request(
        self, method: str, path: str, *, merchant: str | None = "store-001", **kwargs: Any
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
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


@pytest.fixture
async def start_proxy(
    token_server: TokenServer, pos_server: PosServer, ca_file: Path, exposure: Exposure
) -> AsyncIterator[Callable[..., Any]]:
    """Starts ``serve(config)`` with the fakes' configuration plus ``sections``."""
    proxies: list[RunningProxy] = []

    async def start(**sections: Any) -> RunningProxy:
        data = proxy_config(token_server.url, pos_server.url, ca_file, **sections)
        config = parse_config(data, base_dir=Path("."), environ={})
        stop = asyncio.Event()
        started: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, environ={}, stop=stop, started=started.set_result))
        first: list[asyncio.Future[Any]] = [task, started]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            task.result()  # what stopped it from starting
            raise AssertionError("serve() returned without starting")
        serving = started.result()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        proxy = RunningProxy(
            url=f"http://{serving.terminals[0]}",
            metrics_url=f"http://{serving.metrics[0]}",
            config=config,
            app=serving.app,
            session=session,
            exposure=exposure,
            registry=serving.app[STATE].metrics.registry,
            _stop=stop,
            _served=task,
        )
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        if proxy.running:
            await proxy.metrics()
        await proxy.session.close()
    for proxy in proxies:
        await proxy.stop()


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> RunningProxy:
    running: RunningProxy = await start_proxy()
    return running


@pytest.fixture
def redis_server(exposure: Exposure, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        exposure.texts.append(server.log())
