"""``[server] workers = N``: a supervisor, N worker processes on one port, one metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics, WorkersMetrics
from proxy.workers import reserve_port
from tests.fakes import CLIENT_SECRET, IBM_CLIENT_ID, PosServer, TokenServer
from tests.test_cli import ROOT, _free_port, _write_config, spawn_proxy

ACCESS_LINE = re.compile(r"\[worker (\d+) pid (\d+)\] proxy\.access: .* merchant=(\S+)")
VAT = "DK10000001"


@dataclass
class Supervised:
    """A ``mobilepay-proxy`` supervisor under test, with everything it and its workers logged."""

    process: asyncio.subprocess.Process
    url: str
    metrics_url: str
    write_config: Callable[[str], Path]
    lines: list[str] = field(default_factory=list)
    sent: int = 0

    async def calls(self, count: int, merchant: str = "store-001") -> list[int]:
        """``count`` concurrent requests, each on a new connection so the kernel spreads them."""
        self.sent += count
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call(i: int) -> int:
                async with session.get(
                    f"{self.url}/pos/v10/payments/p{i}", headers={"X-Merchant-Id": merchant}
                ) as response:
                    await response.read()
                    return response.status

            return list(await asyncio.gather(*(call(i) for i in range(count))))

    async def get(self, path: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics_url + path) as response,
        ):
            if path == "/metrics":
                return response.status, await response.text()
            return response.status, await response.json()

    async def requests_total(self) -> float:
        _, text = await self.get("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "mobilepay_proxy_requests_total"
        )

    async def pids(self) -> dict[int, int | None]:
        _, body = await self.get("/healthz")
        return {worker["index"]: worker["pid"] for worker in body["workers"]}

    def served(self, merchant: str = "store-001") -> set[tuple[int, int]]:
        """(worker index, pid) of every worker that logged an access line for ``merchant``."""
        return {
            (int(match[1]), int(match[2]))
            for line in self.lines
            if (match := ACCESS_LINE.search(line)) and match[3] == merchant
        }


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def supervised(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, *, ready: bool = True
) -> AsyncIterator[Supervised]:
    port, metrics_port = _free_port(), _free_port()

    def write(extra: str = "") -> Path:
        return _write_config(
            tmp_path / "proxy.toml",
            api=pos_server.url,  # type: ignore[attr-defined]
            token=pos_server.tokens.url,  # type: ignore[attr-defined]
            ca_file=ca_file,
            port=port,
            metrics_port=metrics_port,
            extra=extra,
            extra_server="workers = 2",
        )

    process = await spawn_proxy(write(), stderr=asyncio.subprocess.PIPE, log_level="INFO")
    running = Supervised(
        process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", write
    )

    async def collect() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            running.lines.append(line.decode(errors="replace"))

    collector = asyncio.create_task(collect())
    try:
        if ready:

            async def all_ready() -> bool:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    return (await running.get("/readyz"))[0] == 200
                return False

            await _eventually(all_ready, "both workers ready")
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.wait_for(collector, 5)
    log = "".join(running.lines)
    assert "Traceback" not in log
    for secret in (CLIENT_SECRET, IBM_CLIENT_ID, *pos_server.tokens.issued):
        assert secret not in log


async def test_two_workers_share_the_port_report_as_one_and_reload_together(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, token_server: TokenServer
) -> None:
    async with supervised(tmp_path, ca_file, pos_server) as proxy:
        status, ready = await proxy.get("/readyz")
        assert status == 200
        assert [w["status"] for w in ready["workers"]] == ["ready", "ready"]
        assert len({w["pid"] for w in ready["workers"]}) == 2
        assert all(w["merchants"] == 1 for w in ready["workers"])
        status, health = await proxy.get("/healthz")
        assert (status, health["status"]) == (200, "ok")

        assert await proxy.calls(100) == [200] * 100

        async def both_served() -> bool:  # access lines are written within a second
            return {index for index, _ in proxy.served()} == {0, 1}

        await _eventually(both_served, "access lines of both workers", seconds=5)
        # Counted in two processes, exported once.
        assert await proxy.requests_total() == 100
        # Each worker keeps its own token cache.
        assert 1 <= token_server.count(VAT) <= 2
        expiry = f'mobilepay_proxy_token_expiry_seconds{{merchant_vat="{VAT}"}}'

        async def expiry_published() -> bool:
            return expiry in (await proxy.get("/metrics"))[1]

        # Workers publish their token lifetimes every second.
        await _eventually(expiry_published, "the token expiry gauge")
        _, text = await proxy.get("/metrics")
        assert text.count("mobilepay_proxy_token_expiry_seconds{") == 1
        lifetime = float(text.split(expiry)[1].split()[0])
        assert 3500 < lifetime <= 3600
        assert "mobilepay_proxy_merchants 1.0" in text
        assert "mobilepay_proxy_in_flight_requests 0.0" in text

        # SIGHUP reaches every worker: a new merchant is served by both.
        proxy.write_config('"store-002" = "DK10000002"')
        proxy.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await proxy.calls(20, merchant="store-002") == [200] * 20

        await _eventually(reloaded, "every worker serves the reloaded map")

        async def both_served_reloaded() -> bool:
            return {index for index, _ in proxy.served("store-002")} == {0, 1}

        await _eventually(both_served_reloaded, "access lines of both workers", seconds=5)
        assert "mobilepay_proxy_merchants 2.0" in (await proxy.get("/metrics"))[1]

        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.process.wait(), 15) == 0


async def test_a_killed_worker_is_restarted_and_no_request_fails(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, token_server: TokenServer
) -> None:
    async with supervised(tmp_path, ca_file, pos_server) as proxy:
        assert await proxy.calls(20) == [200] * 20
        before = await proxy.pids()
        victim = before[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)

        async def noticed() -> bool:
            return (await proxy.pids())[0] != victim

        # Reaped by the supervisor, so its listening socket is gone: whatever connects now
        # reaches the other worker, or the replacement once it listens.
        await _eventually(noticed, "the supervisor noticed the dead worker")
        assert await proxy.calls(50) == [200] * 50

        async def replaced() -> bool:
            status, body = await proxy.get("/readyz")
            return status == 200 and body["workers"][0]["pid"] not in (None, victim)

        await _eventually(replaced, "a replacement worker is ready")
        _, body = await proxy.get("/readyz")
        assert body["workers"][0]["restarts"] == 1
        assert body["workers"][1]["pid"] == before[1]
        replacement = body["workers"][0]["pid"]

        async def replacement_serves() -> bool:
            assert await proxy.calls(50) == [200] * 50
            return (0, replacement) in proxy.served()

        await _eventually(replacement_serves, "the replacement takes requests")
        # The killed worker's requests still count: totals never go back.
        assert await proxy.requests_total() == proxy.sent
        assert token_server.count(VAT) <= 3
        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.process.wait(), 15) == 0
    log = "".join(proxy.lines)
    assert f"worker 0 (pid {victim}) was killed by SIGKILL; restarting it in" in log


@pytest.mark.slow
async def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, ca_file: Path, pos_server: PosServer
) -> None:
    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return web.json_response({"ok": True})

    async with supervised(tmp_path, ca_file, pos_server) as proxy:
        pos_server.handler = slow
        calls = asyncio.create_task(proxy.calls(100))

        async def all_upstream() -> bool:
            return len(pos_server.requests) >= 100

        await _eventually(all_upstream, "100 requests in flight")
        proxy.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.get(f"{proxy.url}/pos/v10/payments/late", headers={"X-Merchant-Id": "x"}),
            ):
                pass
        assert await calls == [200] * 100
        assert await asyncio.wait_for(proxy.process.wait(), 15) == 0
    assert {index for index, _ in proxy.served()} == {0, 1}, "both workers had requests to drain"


async def test_a_signal_during_start_up_is_not_lost(
    tmp_path: Path, ca_file: Path, pos_server: PosServer
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, ready=False) as proxy:

        async def supervisor_answers() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                await proxy.get("/healthz")
                return True
            return False

        # The workers are still starting: the signal must wait for their handlers.
        await _eventually(supervisor_answers, "the supervisor listens")
        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.process.wait(), 15) == 0
    assert "killed by" not in "".join(proxy.lines)


async def test_a_taken_port_stops_the_supervisor_with_exit_1(tmp_path: Path, ca_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _write_config(
            tmp_path / "proxy.toml",
            api="https://127.0.0.1:1",
            token="https://127.0.0.1:1/t",
            ca_file=ca_file,
            port=taken.getsockname()[1],
            metrics_port=_free_port(),
            extra_server="workers = 2",
        )
        process = await spawn_proxy(config, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 1
    assert "cannot start: Address already in use" in stderr.decode()
    assert "Traceback" not in stderr.decode()


def test_reserved_port_is_shared_with_workers_only() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved[0].getsockname()[1]
    try:
        with (
            socket.create_server(("127.0.0.1", port), reuse_port=True) as worker,
            socket.create_connection(("127.0.0.1", port), timeout=5),
        ):
            worker.settimeout(5)
            worker.accept()[0].close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as other, pytest.raises(OSError, match="in use") as caught:
            other.bind(("127.0.0.1", port))
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        for sock in reserved:
            sock.close()


# A worker's part of the metrics, as a worker records it in multiprocess mode.
_WORKER_METRICS = """
import os, sys
from prometheus_client import CollectorRegistry
from proxy.metrics import Metrics

metrics = Metrics(CollectorRegistry())
assert metrics.multiprocess
metrics.observe_request("GET", "/pos/v10/payments/{paymentid}", 200, 0.01)
metrics.in_flight.inc()
lifetimes = [(vat, float(seconds)) for vat, seconds in (a.split("=") for a in sys.argv[1:])]
metrics.token_lifetimes = lambda: lifetimes
metrics.publish_token_expiry()
if lifetimes[1:]:
    del lifetimes[1:]  # the merchant left: its token is forgotten
    metrics.publish_token_expiry()
print(os.getpid())
"""


def test_workers_metrics_merge_into_one_view(tmp_path: Path) -> None:
    def worker(*lifetimes: str) -> int:
        result = subprocess.run(
            [sys.executable, "-c", _WORKER_METRICS, *lifetimes],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
            check=True,
        )
        return int(result.stdout)

    first = worker("DK10000001=300", "DK10000002=100")
    second = worker("DK10000001=200")
    merged = WorkersMetrics(tmp_path)
    registry = merged.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    request = {"method": "GET", "route": "/pos/v10/payments/{paymentid}", "status": "200"}
    assert value("mobilepay_proxy_requests_total", **request) == 2
    duration = {"method": "GET", "route": request["route"]}
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    assert value("mobilepay_proxy_in_flight_requests") == 2
    # The shortest remaining life of a merchant's tokens; none for a token nobody holds.
    expiry = "mobilepay_proxy_token_expiry_seconds"
    assert 190 < (value(expiry, merchant_vat="DK10000001") or 0) <= 200
    assert value(expiry, merchant_vat="DK10000002") is None

    merged.worker_exited(second)
    assert 290 < (value(expiry, merchant_vat="DK10000001") or 0) <= 300
    assert value("mobilepay_proxy_in_flight_requests") == 1
    assert value("mobilepay_proxy_requests_total", **request) == 2, "counts outlive a worker"
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    merged.worker_exited(first)
    assert value("mobilepay_proxy_in_flight_requests") is None
    assert value("mobilepay_proxy_requests_total", **request) == 2
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    # Exited workers' counts live on in one file per kind, not one per worker.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]

    # The same families, under the same names, as a single process exports.
    single_registry = CollectorRegistry()
    Metrics(single_registry, multiprocess=False)
    single = {family.name for family in single_registry.collect()}
    assert {family.name for family in registry.collect()} <= single


def test_every_gauge_combines_only_live_workers() -> None:
    # A gauge in another mode would keep an exited worker's value (or a pid label) forever.
    metrics = Metrics(CollectorRegistry(), multiprocess=True)
    gauges = [value for value in vars(metrics).values() if isinstance(value, Gauge)]
    assert len(gauges) >= 4
    assert all(gauge._multiprocess_mode.startswith("live") for gauge in gauges)


def test_a_worker_rewrites_a_token_expiry_only_when_the_token_changes() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, multiprocess=True)
    lifetimes = [("DK10000001", 120.0)]
    metrics.token_lifetimes = lambda: lifetimes

    def published() -> float | None:
        name = "mobilepay_proxy_token_expiry_seconds"
        return registry.get_sample_value(name, {"merchant_vat": "DK10000001"})

    metrics.publish_token_expiry()
    first = published()
    assert first is not None
    lifetimes[0] = ("DK10000001", 119.9)  # the same token, a moment later
    metrics.publish_token_expiry()
    assert published() == first
    lifetimes[0] = ("DK10000001", 3600.0)  # refreshed
    metrics.publish_token_expiry()
    assert published() == pytest.approx(first + 3480, abs=1)
    lifetimes.clear()  # forgotten
    metrics.publish_token_expiry()
    assert published() == math.inf
