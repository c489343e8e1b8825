"""Running the proxy in the foreground: listen, serve, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import (
    STATE,
    ProxyState,
    apply_config,
    create_app,
    create_metrics_app,
    proxy_handler,
)
from proxy.config import Config, ConfigError, load_config
from proxy.edge import EdgeServer
from proxy.logs import flush_soon

log = logging.getLogger(__name__)
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# How often a worker publishes its requests in flight and its tokens' expiry to the metrics
# its supervisor exports: how stale those may be.
PUBLISH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSockets:
    """Where one of several workers listens (see proxy.workers).

    ``port`` is the terminal port, shared with the other workers through ``SO_REUSEPORT``;
    ``control`` is a unix socket answering ``/healthz``, ``/readyz`` and ``/metrics`` for the
    supervisor, in place of ``metrics_port``.
    """

    port: int
    control: Path


@dataclass(frozen=True, slots=True)
class Serving:
    """What :func:`serve` is listening on once it accepts connections, and its app."""

    terminals: list[str]
    metrics: list[str]
    app: web.Application


async def serve(
    config: Config,
    *,
    environ: Mapping[str, str],
    stop: asyncio.Event | None = None,
    worker: WorkerSockets | None = None,
    started: Callable[[Serving], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain in-flight requests.

    SIGHUP re-reads the configuration file. ``started`` is called once every socket
    listens, with the addresses actually bound (port 0 becomes a free port).
    """
    stop = stop or asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _request_reload, reloads)
    # A worker is started with these blocked, so one sent while it started up waits for
    # the handlers above instead of killing it or going unnoticed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    app = create_app(config)
    state = app[STATE]
    drain = config.server.drain_timeout_seconds
    # The app's runner opens and closes the proxy's live parts; it listens nowhere itself.
    runner = web.AppRunner(app, handle_signals=False)
    edge = EdgeServer(proxy_handler(app), config.server, state.metrics)
    metrics_runner = web.AppRunner(create_metrics_app(state), access_log=None)
    await runner.setup()
    await metrics_runner.setup()
    publisher = None
    try:
        metrics_site: web.BaseSite
        if worker is None:
            await edge.listen(config.server.host, config.server.port)
            metrics_site = web.TCPSite(
                metrics_runner, config.server.metrics_host, config.server.metrics_port
            )
        else:
            # The kernel spreads new connections over every worker's socket on the port.
            await edge.listen(config.server.host, worker.port, reuse_port=True)
            metrics_site = web.UnixSite(metrics_runner, worker.control)
        await metrics_site.start()
        if state.metrics.multiprocess:
            publisher = asyncio.create_task(_publish_sampled(state))
        serving = Serving(
            terminals=[address_text(address) for address in edge.addresses],
            metrics=[address_text(address) for address in metrics_runner.addresses],
            app=app,
        )
        log.info(
            "serving terminals on %s, metrics on %s, %d merchants, upstream %s",
            ", ".join(serving.terminals),
            ", ".join(serving.metrics),
            len(config.routing.merchants),
            config.mobilepay.api_base_url,
        )
        if started is not None:
            started(serving)
        reloader = asyncio.create_task(_reload_on_request(state, reloads, environ))
        await stop.wait()
        reloader.cancel()
        log.info("stopping: no new connections, draining for up to %.0f s", drain)
        state.draining = True
    finally:
        # Stops listening at once, lets in-flight requests finish within the drain timeout.
        await edge.close(drain)
        if publisher is not None:
            publisher.cancel()
        await runner.cleanup()
        await metrics_runner.cleanup()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
    log.info("stopped")


def _request_reload(reloads: asyncio.Queue[None]) -> None:
    flush_soon()  # operators send SIGHUP to see the buffered access lines, too
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


async def _publish_sampled(state: ProxyState) -> None:
    while True:
        state.metrics.publish_sampled()
        await asyncio.sleep(PUBLISH_SECONDS)


def address_text(address: str | tuple[Any, ...]) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or a unix socket's path, as logged."""
    if isinstance(address, str):  # a unix socket
        return address
    host, port = address[:2]
    return f"{host}:{port}" if ":" not in str(host) else f"[{host}]:{port}"
