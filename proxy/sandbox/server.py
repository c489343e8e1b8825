"""Serving the simulator on a real socket, for the command line and for tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from .api import SANDBOX, Sandbox, create_sandbox_app
from .jwt import TokenSigner
from .settings import SandboxSettings
from .tls import TlsFiles, ensure_tls_files

# A listener on every address is reached through the loopback one.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    url: URL
    app: web.Application
    # None when serving plain HTTP.
    tls: TlsFiles | None

    @property
    def sandbox(self) -> Sandbox:
        return self.app[SANDBOX]


@contextlib.asynccontextmanager
async def serve(
    settings: SandboxSettings,
    *,
    signer: TokenSigner | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[RunningSandbox]:
    """Run the simulator until the block exits; ``settings.port`` 0 picks a free port."""
    tls = None
    if settings.tls is not None:
        tls = await asyncio.to_thread(
            ensure_tls_files, settings.tls.directory, settings.tls.hostnames
        )
    app = create_sandbox_app(settings, signer=signer, clock=clock)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port,
            ssl_context=tls.server_context() if tls is not None else None,
        )
        await site.start()
        port = runner.addresses[0][1]
        url = URL.build(
            scheme="https" if tls is not None else "http",
            host=_WILDCARDS.get(settings.host, settings.host),
            port=port,
        )
        yield RunningSandbox(url, app, tls)
    finally:
        await runner.cleanup()
