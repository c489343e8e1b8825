"""Request ids: one per request, from the terminal when well-formed, in every answer and log."""

from __future__ import annotations

import json
import uuid

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.request_ids import RequestIds
from tests.conftest import RunningProxy
from tests.fakes import PosServer
from tests.helpers.rawhttp import request_bytes, send_raw

M = ("X-Merchant-Id", "store-001")
MOBILEPAY_CORRELATION_ID = "113568d5-68fc-4434-ad80-6e67402a3f93"


def access_lines(proxy: RunningProxy) -> list[str]:
    return [line for line in proxy.exposure.logs.lines if " proxy.access " in line]


def ids(headers: object) -> list[str]:
    assert isinstance(headers, CIMultiDictProxy)
    return list(headers.getall("X-Request-Id", ()))


def assert_new_uuid4(value: str) -> None:
    assert uuid.UUID(value).version == 4
    assert str(uuid.UUID(value)) == value


async def test_a_terminal_request_id_is_kept_end_to_end(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    request_id = "pos-17.till:2_" + "a" * 50
    assert len(request_id) == 64
    status, headers, _ = await proxy.request(
        "GET", "/pos/v10/payments/p1", headers={"X-Request-Id": request_id}
    )
    assert status == 200
    assert ids(headers) == [request_id]
    (received,) = pos_server.requests
    assert received.headers.getall("X-Request-Id") == [request_id]
    (line,) = access_lines(proxy)
    assert f"request_id={request_id}" in line


@pytest.mark.parametrize(
    "sent",
    [
        [],
        [""],
        ["a" * 65],
        ["two words"],
        ["semi;colon"],
        ["new\u00e6line"],
        ["id-1", "id-2"],
        ["id-1, id-2"],
    ],
)
async def test_a_missing_or_malformed_request_id_is_replaced_by_a_uuid4(
    proxy: RunningProxy, pos_server: PosServer, sent: list[str]
) -> None:
    headers = [M, *(("X-Request-Id", value) for value in sent)]
    response = await send_raw(proxy.url, request_bytes("GET", "/pos/v10/payments/p1", headers))
    assert response.status == 200
    request_id = response.headers["x-request-id"]
    assert_new_uuid4(request_id)
    (received,) = pos_server.requests
    assert received.headers.getall("X-Request-Id") == [request_id]


async def test_every_request_gets_its_own_id(proxy: RunningProxy) -> None:
    seen: set[str] = set()
    for _ in range(3):
        _, headers, _ = await proxy.request("GET", "/pos/v10/payments/p1")
        seen.update(ids(headers))
    assert len(seen) == 3


async def test_a_proxy_error_carries_the_request_id(proxy: RunningProxy) -> None:
    status, headers, body = await proxy.request(
        "GET", "/pos/v10/payments/p1", merchant="store-999", headers={"X-Request-Id": "till-9"}
    )
    assert status == 403
    assert ids(headers) == ["till-9"]
    assert json.loads(body)["correlationId"] == "till-9"
    (line,) = access_lines(proxy)
    assert "request_id=till-9" in line


async def test_mobilepay_correlation_id_of_an_error_goes_to_the_access_line(
    proxy: RunningProxy, pos_server: PosServer
) -> None:
    async def conflict(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(
            {
                "code": "1301",
                "message": "An active payment exists for customer 4520031801",
                "correlationId": MOBILEPAY_CORRELATION_ID,
            },
            status=409,
            headers={"X-Request-Id": "upstream-own-id"},
        )

    pos_server.handler = conflict
    status, headers, body = await proxy.request(
        "POST", "/pos/v10/payments", headers={"X-Request-Id": "till-1"}, data=b"{}"
    )
    assert status == 409
    assert json.loads(body)["correlationId"] == MOBILEPAY_CORRELATION_ID  # relayed unchanged
    assert ids(headers) == ["till-1"]
    (line,) = access_lines(proxy)
    assert "request_id=till-1" in line
    assert f"mobilepay_correlation_id={MOBILEPAY_CORRELATION_ID}" in line
    assert "4520031801" not in "\n".join(proxy.exposure.logs.lines)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", json.dumps({"correlationId": "c-1"}).encode()),
        ("application/json", b'{"correlationId": "c-1"'),
        ("application/json", b'{"correlationId": "two words"}'),
        ("application/json", b'{"correlationId": 17}'),
        ("application/json", b'["c-1"]'),
        ("application/json", json.dumps({"correlationId": "c-1", "pad": "x" * 20000}).encode()),
    ],
)
async def test_only_a_small_json_error_body_is_read_for_a_correlation_id(
    proxy: RunningProxy, pos_server: PosServer, content_type: str, body: bytes
) -> None:
    async def failing(request: web.Request, received: bytes) -> web.StreamResponse:
        return web.Response(status=500, body=body, content_type=content_type)

    pos_server.handler = failing
    status, _, relayed = await proxy.request("GET", "/pos/v10/payments/p1")
    assert (status, relayed) == (500, body)
    (line,) = access_lines(proxy)
    assert "mobilepay_correlation_id=-" in line


def test_new_ids_are_distinct_uuid4s() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(2000)]  # more than one read of random bytes
    assert len(set(made)) == 2000
    for value in made:
        assert uuid.UUID(value).variant == uuid.RFC_4122
        assert_new_uuid4(value)
