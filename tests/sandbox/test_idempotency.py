"""Idempotency keys: required where documented, replayed, and never reused."""

from __future__ import annotations

import json

import pytest

from .conftest import OTHER_VAT, SandboxClient, new_key, payment_body


async def test_replay_returns_the_original_resource(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    body = payment_body(pos_id)
    key = new_key()
    first = await client.pos("POST", "/payments", token, json_body=body, key=key)
    assert first.status == 200
    # The payment is active now, so only a replay can answer 200 here, not 1301.
    replay = await client.pos("POST", "/payments", token, json_body=body, key=key)
    assert (replay.status, replay.raw) == (first.status, first.raw)
    listed = await client.pos("GET", "/payments", token, params={"posId": pos_id})
    assert listed.json == {"paymentIds": [first.json["paymentId"]]}


async def test_replay_ignores_json_formatting(client: SandboxClient, token: str) -> None:
    store_id = await client.first_store(token)
    key = new_key()
    headers = {
        **client.pos_headers(token, idempotency_key=key),
        "Content-Type": "application/json",
    }
    body = {
        "merchantPosId": "p1",
        "storeId": store_id,
        "name": "n",
        "supportedBeaconTypes": ["QR"],
    }
    compact = json.dumps(body, separators=(",", ":"))
    spaced = json.dumps(dict(reversed(body.items())), indent=4)
    first = await client.request("POST", "/pos/v10/pointofsales", headers=headers, data=compact)
    second = await client.request("POST", "/pos/v10/pointofsales", headers=headers, data=spaced)
    assert first.status == second.status == 200
    assert first.json == second.json


async def test_same_key_different_body_is_409_1306(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    key = new_key()
    assert (
        await client.pos("POST", "/payments", token, json_body=payment_body(pos_id), key=key)
    ).status == 200
    other = await client.pos(
        "POST", "/payments", token, json_body=payment_body(pos_id, 99), key=key
    )
    assert (other.status, other.json["code"]) == (409, "1306")
    # Nor may the key be spent on another endpoint.
    prepare = await client.pos(
        "POST", "/payments/prepare", token, json_body={"posId": pos_id, "orderId": "x"}, key=key
    )
    assert (prepare.status, prepare.json["code"]) == (409, "1306")


async def test_refused_requests_do_not_spend_the_key(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    await client.initiate(token, pos_id)
    key = new_key()
    body = payment_body(pos_id)
    refused = await client.pos("POST", "/payments", token, json_body=body, key=key)
    assert (refused.status, refused.json["code"]) == (409, "1301")
    payment_ids = (await client.pos("GET", "/payments", token, params={"posId": pos_id})).json
    await client.pos("POST", f"/payments/{payment_ids['paymentIds'][0]}/cancel", token)
    assert (await client.pos("POST", "/payments", token, json_body=body, key=key)).status == 200


async def test_keys_are_per_merchant(client: SandboxClient, token: str) -> None:
    other_token = await client.token(OTHER_VAT)
    key = new_key()
    mine, _ = await client.create_pos(token)
    theirs, _ = await client.create_pos(other_token)
    first = await client.pos("POST", "/payments", token, json_body=payment_body(mine), key=key)
    second = await client.pos(
        "POST", "/payments", other_token, json_body=payment_body(theirs), key=key
    )
    assert first.status == second.status == 200
    assert first.json != second.json


@pytest.mark.parametrize("path", ["/payments", "/payments/prepare", "/refunds", "/pointofsales"])
async def test_key_is_required(client: SandboxClient, token: str, path: str) -> None:
    answer = await client.pos("POST", path, token, json_body={})
    assert (answer.status, answer.json["code"]) == (400, "1164")


@pytest.mark.parametrize(("key", "code"), [("k" * 37, "1162"), ("  ", "1162")])
async def test_key_is_at_most_36_characters(
    client: SandboxClient, token: str, key: str, code: str
) -> None:
    pos_id, _ = await client.create_pos(token)
    answer = await client.pos("POST", "/payments", token, json_body=payment_body(pos_id), key=key)
    assert (answer.status, answer.json["code"]) == (400, code)
    longest = await client.pos(
        "POST", "/payments", token, json_body=payment_body(pos_id), key="k" * 36
    )
    assert longest.status == 200


async def test_duplicated_key_header_is_1163(client: SandboxClient, token: str) -> None:
    headers = [
        *client.pos_headers(token).items(),
        ("X-MobilePay-Idempotency-Key", "a"),
        ("X-MobilePay-Idempotency-Key", "b"),
    ]
    answer = await client.request("POST", "/pos/v10/payments", headers=headers, json_body={})
    assert (answer.status, answer.json["code"]) == (400, "1163")
