"""Several worker processes on one terminal port, under a supervisor (``[server] workers``).

One event loop keeps one core busy. With ``workers = N`` (N > 1), ``mobilepay-proxy``
becomes a supervisor that starts N copies of the proxy (``python -m proxy worker ...``),
each running :func:`proxy.server.serve` unchanged but for where it listens. With
``workers = 1`` there is no supervisor: the proxy runs as a single process, as before.

- **Terminal port.** Every worker listens on it with ``SO_REUSEPORT``, and the kernel
  spreads new connections over their sockets; while a worker is down, the others take its
  share. The supervisor only holds a bound, never listening, socket on the same address:
  it resolves ``port = 0`` once for all workers and keeps the port from being taken by
  another program while a worker restarts. It never accepts a connection.
- **Metrics.** Workers run prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
  is a fresh directory per supervisor run), and the supervisor serves the merged result on
  ``metrics_port``: counters and histograms add up over every worker that ever ran, so
  totals do not go back when one is restarted; gauges combine as :mod:`proxy.metrics` says.
- **Health.** Each worker answers ``/healthz`` and ``/readyz`` on its own unix socket in the
  supervisor's private run directory (mode 0700). The supervisor's ``/readyz`` asks every
  worker and is ready only when all of them are, listing each one's answer; its
  ``/healthz`` is 200 while every worker process is alive.
- **Signals.** SIGHUP is forwarded to every worker, each of which re-reads the file as a
  single process does. SIGTERM or SIGINT is forwarded as SIGTERM: every worker stops
  listening and drains. The supervisor waits ``drain_timeout_seconds`` plus a margin, kills
  what is left, and exits 0 only if every worker exited 0. Workers start with these signals
  blocked and unblock them once their handlers are in place, so a signal arriving during
  a worker's start-up is acted on, neither lost nor fatal.
- **Restarts.** A worker that exits while the supervisor is not stopping is logged at
  ERROR and started again after a backoff (0.5 s, doubling to 10 s while it keeps dying
  within 10 s). A restarted worker reads the configuration file as it is at that moment.
  A worker whose supervisor has vanished (SIGKILL) notices within a second and drains.
- **Tokens.** Each worker keeps its own token cache unless ``[tokens] store`` is shared, so
  up to N token fetches per merchant are expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.config import Config, ConfigError
from proxy.metrics import WorkersMetrics
from proxy.server import SIGNALS, WorkerSockets, address_text, serve

log = logging.getLogger(__name__)

# Beyond drain_timeout_seconds, for a worker to finish exiting before it is killed.
STOP_MARGIN_SECONDS = 5.0
RESTART_INITIAL_SECONDS = 0.5
RESTART_MAX_SECONDS = 10.0
# A worker that ran at least this long before dying is restarted without added delay.
STABLE_AFTER_SECONDS = 10.0
WORKER_QUERY_TIMEOUT_SECONDS = 2.0
ORPHAN_CHECK_SECONDS = 1.0


def supervise(
    config: Config, *, log_level: str, log_format: str, environ: Mapping[str, str]
) -> int:
    """Run ``config.server.workers`` workers until SIGTERM or SIGINT; return the exit code.

    Raises OSError when the terminal or metrics address cannot be bound.
    """
    if config.source is None:
        raise ConfigError("[server] workers needs the configuration in a file")
    reserved = reserve_port(config.server.host, config.server.port)
    try:
        with tempfile.TemporaryDirectory(prefix="mobilepay-proxy-") as run_dir:
            supervisor = Supervisor(
                config,
                config_path=config.source.absolute(),
                port=reserved[0].getsockname()[1],
                run_dir=Path(run_dir),
                log_level=log_level,
                log_format=log_format,
                environ=environ,
            )
            return asyncio.run(supervisor.run())
    finally:
        for sock in reserved:
            sock.close()


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (never listen on) ``host:port`` as the workers will, with ``SO_REUSEPORT``.

    Port 0 becomes one free port, the same on every address ``host`` resolves to. Binding
    fails now, with a clear OSError, if another program holds the port.
    """
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio binds its listening sockets, so the two agree.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass(slots=True)
class _Worker:
    index: int
    control: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.process.pid if self.process is not None else None,
            "alive": self.alive,
            "restarts": self.restarts,
        }


class Supervisor:
    """Starts, watches, signals and reports on the worker processes."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path,
        port: int,
        run_dir: Path,
        log_level: str,
        log_format: str,
        environ: Mapping[str, str],
    ) -> None:
        self._config = config
        self._port = port
        # Each worker loads it itself, and again on SIGHUP.
        self._config_path = config_path
        self._log_level = log_level
        self._log_format = log_format
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        self._merged = WorkersMetrics(metrics_dir)
        # Set before any worker imports prometheus_client: it decides its mode at import.
        self._environ = {**environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self._workers = [
            _Worker(index, run_dir / f"worker-{index}.sock")
            for index in range(config.server.workers)
        ]
        self._stopping = asyncio.Event()
        self._spawning = asyncio.Lock()

    async def run(self) -> int:
        """Supervise until SIGTERM or SIGINT, then stop every worker; the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        try:
            server = self._config.server
            await web.TCPSite(runner, server.metrics_host, server.metrics_port).start()
            for worker in self._workers:
                worker.session = aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(str(worker.control), force_close=True),
                    timeout=aiohttp.ClientTimeout(total=WORKER_QUERY_TIMEOUT_SECONDS),
                )
            keepers = [asyncio.create_task(self._keep(worker)) for worker in self._workers]
            log.info(
                "supervising %d workers: terminals on %s, metrics on %s",
                len(self._workers),
                address_text((server.host, self._port)),
                ", ".join(address_text(address) for address in runner.addresses),
            )
            await stop.wait()
            return await self._stop(keepers)
        finally:
            for worker in self._workers:
                if worker.session is not None:
                    await worker.session.close()
            await runner.cleanup()
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)

    async def _stop(self, keepers: list[asyncio.Task[int | None]]) -> int:
        drain = self._config.server.drain_timeout_seconds
        log.info("stopping: %d workers draining for up to %.0f s", len(self._workers), drain)
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        _, late = await asyncio.wait(keepers, timeout=drain + STOP_MARGIN_SECONDS)
        if late:
            for worker in self._workers:
                if worker.process is not None and worker.alive:
                    log.error("worker %d did not stop in time; killing it", worker.index)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.wait(keepers)
        # None: the worker was waiting to be restarted, there was nothing to drain.
        codes = [task.result() for task in keepers]
        clean = all(code in (0, None) for code in codes)
        log.info("stopped" if clean else "stopped; not every worker exited cleanly")
        return 0 if clean else 1

    def _reload(self) -> None:
        log.info("SIGHUP: asking %d workers to reload", sum(w.alive for w in self._workers))
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: signal.Signals) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.alive:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _keep(self, worker: _Worker) -> int | None:
        """Keep one worker running until the supervisor stops; its last exit code."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            code: int | None = None
            try:
                process = await self._spawn(worker)
            except OSError as exc:
                log.error("cannot start worker %d: %s", worker.index, exc.strerror or exc)
                pid = None
            else:
                pid = process.pid
                code = await process.wait()
                await asyncio.to_thread(self._merged.worker_exited, pid)
            if self._stopping.is_set():
                return code
            failures = failures + 1 if loop.time() - started < STABLE_AFTER_SECONDS else 1
            # The exponent is capped: 2.0 ** 1024 overflows, and the delay is capped anyway.
            doublings = min(failures - 1, 32)
            delay = min(RESTART_MAX_SECONDS, RESTART_INITIAL_SECONDS * 2.0**doublings)
            log.error(
                "worker %d (pid %s) %s; restarting it in %.1f s",
                worker.index,
                pid if pid is not None else "-",
                _exit_description(code),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return None
            worker.restarts += 1

    async def _spawn(self, worker: _Worker) -> asyncio.subprocess.Process:
        command = [
            sys.executable,
            "-m",
            "proxy",
            "worker",
            "--config",
            str(self._config_path),
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
            "--worker-index",
            str(worker.index),
            "--port",
            str(self._port),
            "--control-socket",
            str(worker.control),
        ]
        # The child inherits the signal mask across fork and exec: with these blocked, a
        # signal sent while it starts up stays pending until serve() has its handlers.
        # One spawn at a time, since the mask belongs to the thread, not to the task.
        async with self._spawning:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                process = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, env=self._environ
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        worker.process = process
        if self._stopping.is_set():
            process.send_signal(signal.SIGTERM)
        log.info("started worker %d (pid %d)", worker.index, process.pid)
        return process

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        # Reads every worker's files; kept off the event loop that watches the workers.
        body = await asyncio.to_thread(generate_latest, self._merged.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        """200 while every worker process is alive."""
        healthy = all(worker.alive for worker in self._workers)
        body = {
            "status": "ok" if healthy else "degraded",
            "workers": [worker.describe() for worker in self._workers],
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready when not stopping and every worker says it is ready; each answer listed."""
        answers = await asyncio.gather(*(self._ask_ready(w) for w in self._workers))
        ready = not self._stopping.is_set() and all(a.get("status") == "ready" for a in answers)
        body = {
            "status": "ready" if ready else "not_ready",
            "draining": self._stopping.is_set(),
            "workers": answers,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _ask_ready(self, worker: _Worker) -> dict[str, Any]:
        described = worker.describe()
        if not worker.alive or worker.session is None:
            return {**described, "status": "down"}
        try:
            async with worker.session.get("http://worker/readyz") as response:
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {**described, "status": "not_answering"}
        if not isinstance(answer, dict):
            return {**described, "status": "not_answering"}
        return {**described, **answer}


def _exit_description(code: int | None) -> str:
    if code is None:
        return "did not start"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


async def run_worker(config: Config, sockets: WorkerSockets, *, environ: Mapping[str, str]) -> None:
    """One worker: :func:`proxy.server.serve` on the shared port, until told to stop.

    It also stops, draining, if its supervisor disappears without stopping it.
    """
    stop = asyncio.Event()
    watcher = asyncio.create_task(_stop_when_orphaned(stop, os.getppid()))
    try:
        await serve(config, environ=environ, stop=stop, worker=sockets)
    finally:
        watcher.cancel()


async def _stop_when_orphaned(stop: asyncio.Event, parent: int) -> None:
    while True:
        await asyncio.sleep(ORPHAN_CHECK_SECONDS)
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone; stopping", parent)
            stop.set()
            return
