"""Soak: many terminals, short-lived tokens, injected 401s, against the simulator, for a while.

Bounded in time (SOAK_SECONDS, default 60) and in concurrency; it stops by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from pathlib import Path

import aiohttp
import psutil
import pytest

from proxy.sandbox.server import serve
from proxy.sandbox.settings import FaultSettings, SandboxSettings, TlsSettings
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.exposure import Exposure
from tests.helpers.processes import Processes

DURATION = float(os.environ.get("SOAK_SECONDS", "60"))
TERMINALS = 200
# Seconds: usable 9 s, refreshed in the background from 6.5 s. Like MobilePay, the simulator
# stamps iat and exp in whole seconds, so a token can expire up to 1 s before its lifetime
# says; shorter lifetimes leave a margin (a tenth) smaller than that.
LIFETIME = 10
VATS = [f"DK{20000000 + n}" for n in range(10)]
KEYS = {f"shop-{n:02d}": VATS[n % len(VATS)] for n in range(20)}
# The simulator's default credentials.
CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID = "demo-client", "demo-secret", "demo-ibm-client"


def _config(path: Path, sandbox_url: str, ca_file: Path) -> Path:
    data = proxy_config(
        f"{sandbox_url}/integrator-authentication/connect/token",
        sandbox_url,
        ca_file,
        mobilepay={
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "ibm_client_id": IBM_CLIENT_ID,
        },
        tokens={"backoff_initial_seconds": 0.2},
        routing={"merchants": KEYS},
    )
    return write_config(path, data)


def _metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


@pytest.mark.slow
@pytest.mark.timeout(DURATION + 120)
async def test_soak(
    tmp_path: Path, processes: Processes, exposure: Exposure, caplog: pytest.LogCaptureFixture
) -> None:
    exposure.secrets.update({CLIENT_SECRET, IBM_CLIENT_ID})
    # The simulator runs in this process: its access line per request would cost the event
    # loop both it and the load share.
    caplog.set_level(logging.WARNING, logger="aiohttp.access")
    settings = SandboxSettings(
        port=0,
        tls=TlsSettings(directory=tmp_path / "tls"),
        token_lifetime_seconds=LIFETIME,
        faults=FaultSettings(unauthorized_every=997),
    )
    async with serve(settings) as sandbox:
        assert sandbox.tls is not None
        config = _config(tmp_path / "proxy.toml", str(sandbox.url), sandbox.tls.ca_cert)
        proxy = await processes.start_proxy(config)
        statuses, proxy_errors, rss = await _load(proxy.url, proxy.running.pid)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.metrics_url}/metrics") as r:
                metrics = await r.text()
            async with session.get(
                f"{sandbox.url}/_sandbox/stats", ssl=sandbox.tls.client_context()
            ) as r:
                stats = await r.json()
        assert await proxy.running.stop(30) == 0

    total = sum(statuses.values())
    assert total > DURATION * 100, f"only {total} requests in {DURATION} s"
    assert proxy_errors == Counter(), f"proxy-caused errors: {proxy_errors}"
    # A replay can itself meet an injected 401; that 401 is MobilePay's, relayed.
    assert set(statuses) <= {200, 401}, statuses
    assert statuses[401] <= stats["injected"]["unauthorized"]

    token_requests = stats["token_requests"]["total"]
    attempts = _metric(metrics, "mobilepay_proxy_token_refreshes_total")
    forced = _metric(metrics, 'mobilepay_proxy_token_refreshes_total{reason="forced"')
    routine = attempts - forced
    # Every token request is one the proxy meant to make ...
    assert token_requests == attempts
    # ... routine ones at most one per merchant per refresh interval (no herd) ...
    assert routine <= len(VATS) * (DURATION / (LIFETIME * 0.65) + 2)
    assert routine >= len(VATS) * DURATION / LIFETIME
    # ... and at most one forced fetch per rejected token.
    assert forced <= stats["injected"]["unauthorized"]
    rss_at_10s, rss_at_end = rss
    assert rss_at_end <= rss_at_10s * 1.10, f"RSS grew from {rss_at_10s} to {rss_at_end}"


async def _load(url: str, pid: int) -> tuple[Counter[int], Counter[str], tuple[int, int]]:
    statuses: Counter[int] = Counter()
    proxy_errors: Counter[str] = Counter()
    keys = list(KEYS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DURATION
    rss_at_10s = 0
    headers = {"X-MobilePay-Client-System-Version": "1.0.0"}

    async def terminal(n: int, session: aiohttp.ClientSession) -> None:
        key = keys[n % len(keys)]
        while loop.time() < deadline:
            async with session.get(
                f"{url}/pos/v10/stores/detailed",
                headers={**headers, "X-Merchant-Id": key},
            ) as response:
                await response.read()
                statuses[response.status] += 1
                if "X-Proxy-Error" in response.headers:
                    proxy_errors[response.headers["X-Proxy-Error"]] += 1

    async def sample_rss() -> None:
        nonlocal rss_at_10s
        await asyncio.sleep(10)
        rss_at_10s = psutil.Process(pid).memory_info().rss

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(terminal(n, session) for n in range(TERMINALS)))
        await sampler
    return statuses, proxy_errors, (rss_at_10s, psutil.Process(pid).memory_info().rss)
