"""``[server] workers = N``: a supervisor, N worker processes on one port, one metrics endpoint.

Each test with a running supervisor starts three interpreters: they are marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ConfigError, parse_config
from proxy.metrics import Metrics, WorkersMetrics
from proxy.workers import (
    RESTART_INITIAL_SECONDS,
    STOP_MARGIN_SECONDS,
    reserve_port,
    supervise,
)
from tests.fakes import PosServer, TokenServer, held_until
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.ports import refuses_connections
from tests.helpers.processes import PROXY, Processes, Proxy, Running
from tests.helpers.waiting import eventually

ACCESS_LINE = re.compile(r"\[worker (\d+) pid (\d+)\] proxy\.access: .* merchant=(\S+)")
VAT = "DK10000001"


@dataclass
class Supervised:
    """A ``mobilepay-proxy`` supervisor under test, with everything it and its workers logged."""

    running: Running
    url: str
    metrics_url: str
    write_config: Callable[..., Path]
    sent: int = 0

    @property
    def process(self) -> Running:
        return self.running

    @property
    def lines(self) -> list[str]:
        return self.running.lines

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

    async def answers(self, path: str) -> bool:
        """Whether ``path`` answers 200 (False while nothing listens yet)."""
        with contextlib.suppress(aiohttp.ClientConnectionError):
            return (await self.get(path))[0] == 200
        return False

    async def total(self, name: str) -> float:
        """The sum of every sample called ``name`` in the supervisor's /metrics."""
        _, text = await self.get("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
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


@contextlib.asynccontextmanager
async def supervised(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    processes: Processes,
    *,
    ready: bool = True,
    **server: Any,
) -> AsyncIterator[Supervised]:
    def write(merchants: dict[str, str] | None = None) -> Path:
        data = proxy_config(
            pos_server.tokens.url,
            pos_server.url,
            ca_file,
            server={"workers": 2, **server},
            routing={"merchants": merchants or {"store-001": VAT}},
        )
        return write_config(tmp_path / "proxy.toml", data)

    started: Proxy = await processes.start_proxy(write())
    running = Supervised(started.running, started.url, started.metrics_url, write)
    if ready:
        await eventually(lambda: running.answers("/readyz"), "both workers ready", 20)
    yield running
    await running.running.stop()
    assert "Traceback" not in running.running.output


@pytest.mark.slow
async def test_two_workers_share_the_port_report_as_one_and_reload_together(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    processes: Processes,
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
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

        await eventually(both_served, "access lines of both workers", seconds=5)
        # Counted in two processes, exported once.
        assert await proxy.total("mobilepay_proxy_requests_total") == 100
        # Each worker keeps its own token cache.
        assert 1 <= token_server.count(VAT) <= 2
        expiry = f'mobilepay_proxy_token_expiry_seconds{{merchant_vat="{VAT}"}}'

        async def expiry_published() -> bool:
            return expiry in (await proxy.get("/metrics"))[1]

        # Workers publish their token lifetimes every second.
        await eventually(expiry_published, "the token expiry gauge")
        _, text = await proxy.get("/metrics")
        assert text.count("mobilepay_proxy_token_expiry_seconds{") == 1
        lifetime = float(text.split(expiry)[1].split()[0])
        assert 3500 < lifetime <= 3600
        assert "mobilepay_proxy_merchants 1.0" in text
        assert "mobilepay_proxy_in_flight_requests 0.0" in text

        # SIGHUP reaches every worker: a new merchant is served by both.
        proxy.write_config({"store-001": VAT, "store-002": "DK10000002"})
        proxy.process.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await proxy.calls(20, merchant="store-002") == [200] * 20

        await eventually(reloaded, "every worker serves the reloaded map")

        async def both_served_reloaded() -> bool:
            return {index for index, _ in proxy.served("store-002")} == {0, 1}

        await eventually(both_served_reloaded, "access lines of both workers", seconds=5)
        assert "mobilepay_proxy_merchants 2.0" in (await proxy.get("/metrics"))[1]

        proxy.process.signal(signal.SIGTERM)
        assert await proxy.process.wait() == 0


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_no_request_fails(
    tmp_path: Path,
    ca_file: Path,
    pos_server: PosServer,
    token_server: TokenServer,
    processes: Processes,
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
        assert await proxy.calls(20) == [200] * 20
        before = await proxy.pids()
        victim = before[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)

        async def noticed() -> bool:
            return (await proxy.pids())[0] != victim

        # Reaped by the supervisor, so its listening socket is gone: whatever connects now
        # reaches the other worker, or the replacement once it listens.
        await eventually(noticed, "the supervisor noticed the dead worker")
        assert await proxy.calls(50) == [200] * 50

        async def replaced() -> bool:
            status, body = await proxy.get("/readyz")
            return status == 200 and body["workers"][0]["pid"] not in (None, victim)

        await eventually(replaced, "a replacement worker is ready")
        _, body = await proxy.get("/readyz")
        assert body["workers"][0]["restarts"] == 1
        assert body["workers"][1]["pid"] == before[1]
        replacement = body["workers"][0]["pid"]

        async def replacement_serves() -> bool:
            assert await proxy.calls(50) == [200] * 50
            return (0, replacement) in proxy.served()

        await eventually(replacement_serves, "the replacement takes requests")
        # The killed worker's requests still count: totals never go back.
        assert await proxy.total("mobilepay_proxy_requests_total") == proxy.sent
        assert token_server.count(VAT) <= 3
        proxy.process.signal(signal.SIGTERM)
        assert await proxy.process.wait() == 0
    log = "".join(proxy.lines)
    assert f"worker 0 (pid {victim}) was killed by SIGKILL; restarting it in" in log


@pytest.mark.slow
async def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    release = asyncio.Event()

    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
        pos_server.handler = held_until(release)
        calls = asyncio.create_task(proxy.calls(100))
        await eventually(lambda: len(pos_server.requests) == 100, "100 requests in flight")
        proxy.process.signal(signal.SIGTERM)
        await eventually(lambda: refuses_connections(proxy.url), "new connections refused")
        assert not calls.done()
        release.set()
        assert await calls == [200] * 100
        assert await proxy.process.wait() == 0
    assert {index for index, _ in proxy.served()} == {0, 1}, "both workers had requests to drain"


@pytest.mark.slow
async def test_requests_in_flight_add_up_over_the_workers(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    release = asyncio.Event()

    async def in_flight() -> float:
        return await proxy.total("mobilepay_proxy_in_flight_requests")

    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
        pos_server.handler = held_until(release)
        calls = asyncio.create_task(proxy.calls(20))
        await eventually(lambda: len(pos_server.requests) == 20, "20 requests in flight")
        await eventually(lambda: _equals(in_flight(), 20), "20 in flight over both workers")
        release.set()
        assert await calls == [200] * 20
        await eventually(lambda: _equals(in_flight(), 0), "none in flight once answered")
    assert {index for index, _ in proxy.served()} == {0, 1}, "both workers had requests"


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


@pytest.mark.slow
async def test_a_worker_still_draining_after_the_timeout_and_margin_is_killed(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    drain = 0.5
    async with supervised(
        tmp_path, ca_file, pos_server, processes, drain_timeout_seconds=drain
    ) as proxy:
        pids = [pid for pid in (await proxy.pids()).values() if pid is not None]
        # Workers that cannot act on SIGTERM, as if stuck: only SIGKILL ends them.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        stopping = loop.time()
        proxy.process.signal(signal.SIGTERM)
        assert await proxy.process.wait(30) == 1
        waited = loop.time() - stopping
    assert waited >= drain + STOP_MARGIN_SECONDS
    for index in range(2):
        assert f"worker {index} did not stop in time; killing it" in proxy.running.output
    assert "stopped; not every worker exited cleanly" in proxy.running.output
    for pid in pids:
        assert not psutil.pid_exists(pid)


@pytest.mark.slow
async def test_a_worker_whose_supervisor_dies_stops_by_itself(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
        pids = [pid for pid in (await proxy.pids()).values() if pid is not None]
        supervisor = proxy.process.pid
        proxy.process.signal(signal.SIGKILL)
        # The workers share the supervisor's output: it ends when the last of them exits.
        assert await proxy.process.wait() == -signal.SIGKILL
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert proxy.running.output.count(f"the supervisor (pid {supervisor}) is gone; stopping") == 2


@pytest.mark.slow
async def test_a_worker_that_keeps_dying_is_restarted_ever_later(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, processes) as proxy:
        delays = []
        for attempt in range(2):
            victim = (await proxy.pids())[0]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            pattern = re.compile(
                rf"worker 0 \(pid {victim}\) was killed by SIGKILL; restarting it in ([\d.]+) s"
            )
            delays.append(float((await proxy.running.line(pattern))[1]))

            async def replaced(victim: int = victim) -> bool:
                status, body = await proxy.get("/readyz")
                worker = body["workers"][0]
                return status == 200 and worker["pid"] not in (None, victim)

            await eventually(replaced, f"replacement {attempt + 1} ready", 20)
        _, body = await proxy.get("/readyz")
        assert body["workers"][0]["restarts"] == 2
    # Dying again within STABLE_AFTER_SECONDS doubles the wait.
    assert delays == [RESTART_INITIAL_SECONDS, RESTART_INITIAL_SECONDS * 2]


@pytest.mark.slow
async def test_a_signal_during_start_up_is_not_lost(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    async with supervised(tmp_path, ca_file, pos_server, processes, ready=False) as proxy:
        # The supervisor listens; the workers are still starting, and the signal must wait
        # for their handlers.
        proxy.process.signal(signal.SIGTERM)
        assert await proxy.process.wait() == 0
    assert "killed by" not in proxy.running.output


async def test_a_taken_port_stops_the_supervisor_with_exit_1(
    tmp_path: Path, ca_file: Path, processes: Processes
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = proxy_config(
            "https://127.0.0.1:1/t",
            "https://127.0.0.1:1",
            ca_file,
            server={"workers": 2, "port": taken.getsockname()[1]},
        )
        config = write_config(tmp_path / "proxy.toml", data)
        running = await processes.start(*PROXY, "--config", config)
        assert await running.wait() == 1
    assert "cannot start: Address already in use" in running.output
    assert "Traceback" not in running.output


def test_workers_need_the_configuration_in_a_file(ca_file: Path) -> None:
    data = proxy_config(
        "https://127.0.0.1:1/t", "https://127.0.0.1:1", ca_file, server={"workers": 2}
    )
    config = parse_config(data, base_dir=Path("."), environ={})
    with pytest.raises(ConfigError, match=r"\[server\] workers needs the configuration in a file"):
        supervise(config, log_level="INFO", log_format="text", environ={})


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


# A worker's part of the metrics, as a worker records it in multiprocess mode: a request,
# and a value in every gauge.
_WORKER_METRICS = """
import os, time
from prometheus_client import CollectorRegistry, Gauge
from proxy.metrics import Metrics

metrics = Metrics(CollectorRegistry())
assert metrics.multiprocess
metrics.observe_request("GET", "/pos/v10/payments/{paymentid}", 200, 0.01)
gauges = [value for value in vars(metrics).values() if isinstance(value, Gauge)]
assert len(gauges) >= 3
for gauge in gauges:
    try:
        gauge.inc()
    except ValueError:  # labelled by merchant VAT: when the token expires
        gauge.labels("DK10000001").set(time.time() + 100)
print(os.getpid())
"""


def test_workers_metrics_merge_into_one_view(tmp_path: Path, processes: Processes) -> None:
    def worker() -> int:
        result = processes.run(
            sys.executable,
            "-c",
            _WORKER_METRICS,
            env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    first, second = worker(), worker()
    merged = WorkersMetrics(tmp_path)
    registry = merged.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    def gauge_samples() -> list[Any]:
        return [
            sample
            for family in registry.collect()
            if family.type == "gauge"
            for sample in family.samples
        ]

    request = {"method": "GET", "route": "/pos/v10/payments/{paymentid}", "status": "200"}
    assert value("mobilepay_proxy_requests_total", **request) == 2
    duration = {"method": "GET", "route": request["route"]}
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    assert value("mobilepay_proxy_in_flight_requests") == 2
    assert value("mobilepay_proxy_merchants") == 1
    assert (value("mobilepay_proxy_token_expiry_seconds", merchant_vat="DK10000001") or 0) > 90

    merged.worker_exited(second)
    assert value("mobilepay_proxy_in_flight_requests") == 1
    assert value("mobilepay_proxy_requests_total", **request) == 2, "counts outlive a worker"
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    merged.worker_exited(first)
    # Every gauge combines live workers only: none keeps an exited worker's value.
    assert gauge_samples() == []
    assert value("mobilepay_proxy_requests_total", **request) == 2
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 2
    # Exited workers' counts live on in the supervisor, not in one file per worker.
    assert sorted(path.name for path in tmp_path.iterdir()) == []

    # A worker started later adds to what the exited ones counted, bucket by bucket.
    worker()
    assert value("mobilepay_proxy_requests_total", **request) == 3
    assert value("mobilepay_proxy_request_duration_seconds_count", **duration) == 3
    assert value("mobilepay_proxy_request_duration_seconds_bucket", **duration, le="0.005") == 0
    assert value("mobilepay_proxy_request_duration_seconds_bucket", **duration, le="0.025") == 3
    assert value("mobilepay_proxy_request_duration_seconds_sum", **duration) == pytest.approx(0.03)
    assert value("mobilepay_proxy_in_flight_requests") == 1

    # The same families, under the same names, as a single process exports.
    single_registry = CollectorRegistry()
    Metrics(single_registry, multiprocess=False)
    single = {family.name for family in single_registry.collect()}
    assert {family.name for family in registry.collect()} <= single
