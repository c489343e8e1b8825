"""A real Prometheus scrapes the real proxy, evaluates the shipped alert rules and runs the
dashboard's queries.

It starts the ``prometheus`` binary from Debian's ``prometheus`` package, which
``.ci/run`` installs; without it the test fails rather than skips.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from yarl import URL

from tests.conftest import RunningProxy
from tests.helpers import ROOT
from tests.helpers.dashboard import panel_queries
from tests.helpers.ports import ADDRESS
from tests.helpers.processes import Processes, Running

PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
PROXY_JOB = "mobilepay-proxy"
WAIT_SECONDS = 30.0
# Grafana fills these in before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}
NOT_EVALUATED = "0001-01-01T00:00:00Z"

T = TypeVar("T")

pytestmark = pytest.mark.slow


def _prometheus_config(target: str) -> dict[str, Any]:
    """The shipped configuration, scraping ``target`` every second instead of ``proxy:9180``."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config["rule_files"]]
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == PROXY_JOB)
    job["static_configs"] = [{"targets": [target]}]
    return config


# Prometheus logs the address it bound (port 0 asked for): address=127.0.0.1:40123
LISTENING = re.compile(rf'msg="Listening on" address=({ADDRESS})')
READY = re.compile("Server is ready to receive web requests")


class Prometheus:
    def __init__(self, running: Running, api: URL) -> None:
        self.running = running
        self.api = api
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    def fail(self, message: str) -> None:
        tail = self.running.lines[-20:]
        pytest.fail(f"{message}\nprometheus log:\n" + "".join(tail), pytrace=False)

    async def get(self, path: str, *, why: str = "", **params: str) -> Any:
        async with self.session.get(self.api / path, params=params) as response:
            body = await response.json()
        if body.get("status") != "success":
            self.fail(f"{why}GET /api/v1/{path} {params}: {json.dumps(body)}")
        return body["data"]

    async def query(self, expr: str, *, why: str = "") -> list[dict[str, Any]]:
        """An instant query's result vector; fails on a syntax or evaluation error."""
        result: list[dict[str, Any]] = (await self.get("query", why=why, query=expr))["result"]
        return result

    async def value(self, expr: str) -> str | None:
        """The single value ``expr`` evaluates to, or None while it has no data."""
        result = await self.query(expr)
        assert len(result) <= 1, result
        return result[0]["value"][1] if result else None

    async def eventually(self, what: str, check: Callable[[], Awaitable[T | None]]) -> T:
        """``check()``'s first result other than None, within WAIT_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        last: object = None
        while loop.time() < deadline:
            if self.running.process.returncode is not None:
                self.fail(f"prometheus exited with {self.running.process.returncode}")
            try:
                result = await check()
            except aiohttp.ClientConnectionError as exc:
                # Not listening yet.
                last = type(exc).__name__
            else:
                if result is not None:
                    return result
                last = "no result yet"
            await asyncio.sleep(0.25)
        self.fail(f"{what}: not within {WAIT_SECONDS:.0f} s (last: {last})")
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        await self.session.close()
        await self.running.stop(10)


async def _start_prometheus(processes: Processes, tmp_path: Path, target: str) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed; it comes with Debian's `prometheus` package "
            "(apt-get install prometheus), which .ci/run installs",
            pytrace=False,
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(target)), encoding="utf-8")
    running = await processes.start(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        "--web.listen-address=127.0.0.1:0",
    )
    address = (await running.line(LISTENING))[1]
    await running.line(READY)
    return Prometheus(running, URL(f"http://{address}/api/v1/"))


async def test_prometheus_scrapes_the_proxy_and_runs_the_alerts_and_dashboard(
    start_proxy: Callable[..., Awaitable[RunningProxy]], tmp_path: Path, processes: Processes
) -> None:
    proxy = await start_proxy()
    status, _, _ = await proxy.request("GET", "/pos/v10/pointofsales")
    assert status == 200
    first_token = {"reason": "initial", "result": "success"}
    assert proxy.sample("mobilepay_proxy_token_refreshes_total", first_token) == 1

    metrics = URL(proxy.metrics_url)
    prometheus = await _start_prometheus(processes, tmp_path, f"{metrics.host}:{metrics.port}")
    try:
        # The proxy runs on this event loop: every wait below must yield to it.
        async def token_fetches() -> str | None:
            return await prometheus.value(
                'mobilepay_proxy_token_refreshes_total{reason="initial",result="success"}'
            )

        assert await prometheus.eventually("the first token fetch", token_fetches) == "1"

        async def evaluated_rules() -> list[dict[str, Any]] | None:
            groups = (await prometheus.get("rules", type="alert"))["groups"]
            rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
            return rules if all(r["lastEvaluation"] != NOT_EVALUATED for r in rules) else None

        rules = await prometheus.eventually("every alert rule evaluated", evaluated_rules)
        assert rules
        broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
        assert not broken, f"alert rules failing against real data: {broken}"
        # Healthy proxy, healthy upstream: nothing may fire or even be pending.
        active = {rule["name"]: rule["state"] for rule in rules if rule["state"] != "inactive"}
        assert not active, f"alerts active against a healthy proxy: {active}"

        for title, expr in panel_queries():
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            await prometheus.query(expr, why=f"dashboard panel {title!r}: ")

        async def merchants() -> str | None:
            return await prometheus.value("max(mobilepay_proxy_merchants)")

        loaded = await prometheus.eventually("the merchant gauge", merchants)
        assert int(loaded) == len(proxy.config.routing.merchants)
    finally:
        await prometheus.stop()
