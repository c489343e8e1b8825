"""Running the proxy in the foreground: listen, serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping

from aiohttp import web

from proxy.app import STATE, ProxyState, apply_config, create_app, create_metrics_app
from proxy.config import Config, ConfigError, load_config
from proxy.protocol import ProxyRunner

log = logging.getLogger(__name__)


async def serve(
    config: Config, *, environ: Mapping[str, str], stop: asyncio.Event | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain in-flight requests.

    SIGHUP re-reads the configuration file.
    """
    stop = stop or asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _request_reload, reloads)

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
        reloader = asyncio.create_task(_reload_on_request(state, reloads, environ))
        await stop.wait()
        reloader.cancel()
        log.info("stopping: no new connections, draining for up to %.0f s", drain)
        state.draining = True
    finally:
        # Stops listening at once, lets in-flight requests finish within the drain timeout.
        await runner.cleanup()
        await metrics_runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info("stopped")


def _request_reload(reloads: asyncio.Queue[None]) -> None:
    # Signals arriving during a reload fold into one more reload after it.
    with contextlib.suppress(asyncio.QueueFull):
        reloads.put_nowait(None)


async def _reload_on_request(
    state: ProxyState, reloads: asyncio.Queue[None], environ: Mapping[str, str]
) -> None:
    while True:
        await reloads.get()
        path = state.config.source
        if path is None:
            log.warning("reload requested, but the configuration did not come from a file")
            continue
        try:
            new = await asyncio.to_thread(load_config, path, environ)
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays in force: %s", exc)
            continue
        ignored = apply_config(state, new)
        log.info("reloaded %s: %d merchants", path, len(new.routing.merchants))
        if ignored:
            log.warning(
                "changed settings that take effect only after a restart: %s", ", ".join(ignored)
            )


def _addresses(runner: web.AppRunner) -> str:
    return ", ".join(
        f"{host}:{port}" if ":" not in str(host) else f"[{host}]:{port}"
        for host, port, *_ in runner.addresses
    )
