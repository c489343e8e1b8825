"""Running the proxy in the foreground: listen, serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from proxy.app import STATE, create_app, create_metrics_app
from proxy.config import Config
from proxy.protocol import ProxyRunner

log = logging.getLogger(__name__)


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain in-flight requests."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    app = create_app(config)
    state = app[STATE]
    drain = config.server.drain_timeout_seconds
    # The proxy logs its own access lines, with the merchant and token fingerprint.
    runner = ProxyRunner(
        app,
        header_timeout=config.server.header_timeout_seconds,
        access_log=None,
        shutdown_timeout=drain,
        handle_signals=False,
    )
    metrics_runner = web.AppRunner(create_metrics_app(state), access_log=None)
    await runner.setup()
    await metrics_runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, backlog=1024)
        await site.start()
        metrics_site = web.TCPSite(
            metrics_runner, config.server.metrics_host, config.server.metrics_port
        )
        await metrics_site.start()
        log.info(
            "serving terminals on %s, metrics on %s, %d merchants, upstream %s",
            _addresses(runner),
            _addresses(metrics_runner),
            len(config.routing.merchants),
            config.mobilepay.api_base_url,
        )
        await stop.wait()
        log.info("stopping: no new connections, draining for up to %.0f s", drain)
        state.draining = True
    finally:
        # Stops listening at once, lets in-flight requests finish within the drain timeout.
        await runner.cleanup()
        await metrics_runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


def _addresses(runner: web.AppRunner) -> str:
    return ", ".join(
        f"{host}:{port}" if ":" not in str(host) else f"[{host}]:{port}"
        for host, port, *_ in runner.addresses
    )
