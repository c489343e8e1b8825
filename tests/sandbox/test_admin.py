"""The /_sandbox/ admin API: faults, counters and the request log."""

from __future__ import annotations

import time

import pytest

from .conftest import VAT, SandboxClient, StartSandbox

STORES = "/stores/detailed"


async def test_unauthorized_next_refuses_that_many_calls(client: SandboxClient, token: str) -> None:
    faults = await client.admin("POST", "/faults", {"unauthorized_next": 2})
    assert faults["unauthorized_next"] == 2
    statuses = [(await client.pos("GET", STORES, token)).status for _ in range(3)]
    assert statuses == [401, 401, 200]
    assert (await client.admin("GET", "/faults"))["unauthorized_next"] == 0
    stats = await client.admin("GET", "/stats")
    assert stats["injected"]["unauthorized"] == 2
    assert stats["pos_requests"]["by_status"] == {"200": 1, "401": 2}


async def test_unauthorized_every_from_settings(start_sandbox: StartSandbox) -> None:
    from proxy.sandbox.settings import FaultSettings

    client = await start_sandbox(faults=FaultSettings(unauthorized_every=3))
    token = await client.token()
    statuses = [(await client.pos("GET", STORES, token)).status for _ in range(6)]
    assert statuses == [200, 200, 401, 200, 200, 401]


async def test_forced_401_has_an_empty_body(client: SandboxClient, token: str) -> None:
    await client.admin("POST", "/faults", {"unauthorized_next": 1})
    answer = await client.pos("GET", STORES, token)
    assert (answer.status, answer.raw) == (401, b"")


async def test_errors_next_answers_500_with_a_2xxx_code(client: SandboxClient, token: str) -> None:
    await client.admin("POST", "/faults", {"errors_next": 1})
    answer = await client.pos("GET", STORES, token)
    assert answer.status == 500
    assert 2000 <= int(answer.json["code"]) <= 2999
    assert answer.json["correlationId"]
    assert (await client.pos("GET", STORES, token)).status == 200


async def test_error_rate(client: SandboxClient, token: str) -> None:
    await client.admin("POST", "/faults", {"error_rate": 1})
    assert {(await client.pos("GET", STORES, token)).status for _ in range(3)} == {500}
    await client.admin("POST", "/faults", {"error_rate": 0.0})
    assert (await client.pos("GET", STORES, token)).status == 200
    assert (await client.admin("GET", "/stats"))["injected"]["errors"] == 3


async def test_token_errors_next(client: SandboxClient) -> None:
    await client.admin("POST", "/faults", {"token_errors_next": 1})
    failed = await client.token_answer()
    assert failed.status == 500
    assert (await client.token_answer()).status == 200


async def test_latency(client: SandboxClient, token: str) -> None:
    await client.admin("POST", "/faults", {"latency_ms": 150})
    started = time.monotonic()
    assert (await client.pos("GET", STORES, token)).status == 200
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    await client.admin("GET", "/stats")
    assert time.monotonic() - started < 0.15


@pytest.mark.parametrize(
    "body",
    [{"latency_ms": -1}, {"error_rate": 2}, {"error_rate": "x"}, {"surprise": 1}, [1], None],
)
async def test_bad_fault_updates_are_400(client: SandboxClient, body: object) -> None:
    answer = await client.request("POST", "/_sandbox/faults", json_body=body)
    assert answer.status == 400
    assert "error" in answer.json
    assert (await client.admin("GET", "/faults"))["latency_ms"] == 0


async def test_stats_and_reset(client: SandboxClient, token: str) -> None:
    await client.pos("GET", STORES, token)
    await client.pos("GET", "/payments", token)
    await client.user("checkin", "nobody", "+4520031801")
    await client.admin("POST", "/faults", {"latency_ms": 1})
    stats = await client.admin("GET", "/stats")
    assert stats["pos_requests"] == {
        "total": 2,
        "by_status": {"200": 1, "400": 1},
        "by_merchant_vat": {VAT: 2},
    }
    assert stats["user_simulation_requests"] == 1
    assert stats["token_requests"]["issued"] == 1

    reset = await client.admin("POST", "/reset")
    assert reset["pos_requests"]["total"] == 0
    assert reset["token_requests"]["total"] == 0
    assert (await client.admin("GET", "/faults"))["latency_ms"] == 0
    assert await client.admin("GET", "/requests") == []
    # Tokens and resources survive a reset.
    assert (await client.pos("GET", STORES, token)).status == 200


async def test_request_log_shows_what_arrived(client: SandboxClient, token: str) -> None:
    await client.pos("GET", STORES, token, params={"merchantBrandId": "b"})
    *_, seen = await client.admin("GET", "/requests")
    assert seen["method"] == "GET"
    assert seen["path"] == "/pos/v10/stores/detailed?merchantBrandId=b"
    assert seen["status"] == 200
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers["authorization"] == f"Bearer {token}"
    assert headers["x-mobilepay-client-system-version"] == "1.2.3"


async def test_health(client: SandboxClient) -> None:
    assert await client.admin("GET", "/health") == {"status": "ok"}
