"""The published PoS V10 description as a test: the route table, and schemathesis runs.

The schemathesis runs fuzz (a) the simulator directly and (b) the proxy in front of it,
with a fixed seed and a bounded number of examples per operation, and fail on any 5xx, any
response that does not match the spec's schemas, any proxy error that is not an
``ErrorResponse``, any wrong ``Allow`` on a 405, and any refusal of a schema-valid request
that is not one of ``tests.spec_checks.KNOWN_DIFFERENCES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import STATE, create_app, proxy_handler
from proxy.config import parse_config
from proxy.edge import EdgeServer
from proxy.routing import POS_V10_ROUTES
from proxy.sandbox.server import RunningSandbox, serve
from proxy.sandbox.settings import SandboxSettings, TlsSettings
from tests.conftest import Exposure
from tests.pos_spec import SPEC_PATH, path_methods

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID = "spec-client", "spec-secret-Qw7", "spec-ibm-client"
VAT = "DK90000028"
SEED = 20240601
# What every terminal sends; fuzzing it only meets code 1160 on every operation.
SYSTEM_VERSION = "X-MobilePay-Client-System-Version: 1.2.3"
MAX_EXAMPLES = 25
# One run takes 40-70 s on this project's 2-core machine, and over twice that under coverage
# while the machine is busy; the suite's 120 s per test is too tight for it.
SCHEMATHESIS_SECONDS = 240
CHECKS = (
    "not_a_server_error,response_schema_conformance,allow_header_conformance,"
    "proxy_errors_are_error_responses,schema_valid_requests_are_accepted"
)


def test_the_route_table_is_the_one_in_pos_yaml() -> None:
    assert path_methods() == POS_V10_ROUTES


@contextlib.asynccontextmanager
async def simulator(tls_dir: Path) -> AsyncIterator[RunningSandbox]:
    settings = SandboxSettings(
        port=0,
        tls=TlsSettings(tls_dir),
        poll_delay_ms=10,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        ibm_client_id=IBM_CLIENT_ID,
        seed=SEED,
    )
    async with serve(settings) as running:
        yield running


@contextlib.asynccontextmanager
async def proxy_in_front_of(running: RunningSandbox) -> AsyncIterator[str]:
    assert running.tls is not None
    base = str(running.url)
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0},
        "mobilepay": {
            "api_base_url": base,
            "token_url": f"{base}/integrator-authentication/connect/token",
            "ca_file": str(running.tls.ca_cert),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "ibm_client_id": IBM_CLIENT_ID,
        },
        "routing": {
            "allowed_prefixes": ["/pos/v10/", "/pos/app/usersimulation/"],
            "merchants": {"shop-1": VAT},
        },
    }
    config = parse_config(data, base_dir=Path("."), environ={})
    app = create_app(config, registry=CollectorRegistry())
    runner = web.AppRunner(app)
    await runner.setup()
    edge = EdgeServer(proxy_handler(app), config.server, app[STATE].metrics)
    try:
        await edge.listen("127.0.0.1", 0)
        yield f"http://127.0.0.1:{edge.addresses[0][1]}"
    finally:
        await edge.close(1)
        await runner.cleanup()


async def _token(running: RunningSandbox) -> str:
    assert running.tls is not None
    connector = aiohttp.TCPConnector(ssl=running.tls.client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            running.url.with_path("/integrator-authentication/connect/token"),
            data={"grant_type": "client_credentials", "merchant_vat": VAT},
            headers={
                "Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET),
                "x-ibm-client-id": IBM_CLIENT_ID,
            },
        ) as response,
    ):
        assert response.status == 200
        token: str = (await response.json())["access_token"]
        return token


async def schemathesis(
    url: str, *headers: str, directory: Path, ca_file: Path | None = None
) -> tuple[int, str]:
    """Run ``st run`` on the vendored pos.yaml against ``url``; its exit code and output.

    It runs in ``directory``, where it keeps its cache.
    """
    argv = [
        str(Path(sys.executable).with_name("st")),
        "run",
        str(SPEC_PATH),
        "--url",
        url,
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--output-truncate",
        "false",
    ]
    if ca_file is not None:
        argv += ["--tls-verify", str(ca_file)]
    for header in headers:
        argv += ["--header", header]
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=directory,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.spec_checks", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SCHEMATHESIS_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(SCHEMATHESIS_SECONDS + 60)
async def test_the_simulator_answers_as_pos_yaml_says(tmp_path: Path) -> None:
    async with simulator(tmp_path / "tls") as running:
        assert running.tls is not None
        token = await _token(running)
        code, output = await schemathesis(
            str(running.url),
            f"Authorization: Bearer {token}",
            f"x-ibm-client-id: {IBM_CLIENT_ID}",
            f"X-MobilePay-Merchant-VAT-Number: {VAT}",
            SYSTEM_VERSION,
            directory=tmp_path,
            ca_file=running.tls.ca_cert,
        )
    assert code == 0, output


@pytest.mark.slow
@pytest.mark.timeout(SCHEMATHESIS_SECONDS + 60)
async def test_the_proxy_answers_as_pos_yaml_says(tmp_path: Path, exposure: Exposure) -> None:
    exposure.tokens.update({CLIENT_SECRET, IBM_CLIENT_ID})
    async with simulator(tmp_path / "tls") as running, proxy_in_front_of(running) as url:
        code, output = await schemathesis(
            url, "X-Merchant-Id: shop-1", SYSTEM_VERSION, directory=tmp_path
        )
    exposure.texts.append(output)
    assert code == 0, output
