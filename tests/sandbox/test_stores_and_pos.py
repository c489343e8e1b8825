"""Stores seeded per merchant, and points of sale."""

from __future__ import annotations

import uuid

import pytest

from .conftest import OTHER_VAT, VAT, SandboxClient, new_key


async def test_stores_are_seeded_per_merchant(client: SandboxClient, token: str) -> None:
    answer = await client.pos("GET", "/stores/detailed", token)
    assert answer.status == 200
    stores = answer.json
    assert [store["merchantLocationId"] for store in stores] == ["10001", "10002", "10003"]
    assert {store["merchantBrandId"] for store in stores} == {f"POS{VAT}"}
    assert set(stores[0]) == {
        "storeName",
        "storeId",
        "storeStreet",
        "storeZipCode",
        "storeCity",
        "brandName",
        "merchantBrandId",
        "merchantLocationId",
    }
    other = await client.pos("GET", "/stores/detailed", await client.token(OTHER_VAT))
    assert {s["storeId"] for s in stores}.isdisjoint({s["storeId"] for s in other.json})


async def test_finnish_merchants_get_finnish_stores(client: SandboxClient) -> None:
    answer = await client.pos("GET", "/stores/detailed", await client.token("FI12345678"))
    assert answer.json[0]["storeCity"] == "Helsinki"


async def test_store_lookup(client: SandboxClient, token: str) -> None:
    stores = (await client.pos("GET", "/stores/detailed", token)).json
    second = stores[1]
    answer = await client.pos(
        "GET",
        "/stores",
        token,
        params={"merchantBrandId": f"POS{VAT}", "merchantLocationId": "10002"},
    )
    assert answer.json == {"storeIds": [second["storeId"]]}
    brand = await client.pos("GET", "/stores", token, params={"merchantBrandId": f"POS{VAT}"})
    assert len(brand.json["storeIds"]) == 3
    single = await client.pos("GET", f"/stores/{second['storeId']}", token)
    assert single.json == second


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "1122"),
        ({"merchantBrandId": ""}, "1119"),
        ({"merchantBrandId": "x", "merchantLocationId": "<bad>"}, "1120"),
    ],
)
async def test_store_filter_errors(
    client: SandboxClient, token: str, params: dict[str, str], code: str
) -> None:
    answer = await client.pos("GET", "/stores", token, params=params)
    assert (answer.status, answer.json["code"]) == (400, code)


async def test_unknown_and_foreign_stores_are_404(client: SandboxClient, token: str) -> None:
    other_store = await client.first_store(await client.token(OTHER_VAT))
    for store_id in (str(uuid.uuid4()), other_store, "not-a-guid"):
        answer = await client.pos("GET", f"/stores/{store_id}", token)
        assert (answer.status, answer.raw) == (404, b"")


async def test_create_and_query_point_of_sale(client: SandboxClient, token: str) -> None:
    store_id = await client.first_store(token)
    pos_id, beacon_id = await client.create_pos(
        token, merchantPosId="My-Pos-1", name="Cafeteria register #2", callbackAlias="Alias"
    )
    answer = await client.pos("GET", f"/pointofsales/{pos_id}", token)
    assert answer.json == {
        "posId": pos_id,
        "merchantPosId": "My-Pos-1",
        "storeId": store_id,
        "name": "Cafeteria register #2",
        "beaconId": beacon_id,
        "callbackAlias": "Alias",
        "supportedBeaconTypes": ["QR", "Bluetooth"],
        "requirePaymentBeforeCheckin": False,
    }
    for params in ({"storeId": store_id}, {"beaconId": beacon_id}, {"merchantPosId": "My-Pos-1"}):
        found = await client.pos("GET", "/pointofsales", token, params=params)
        assert found.json == {"posIds": [pos_id]}
    none = await client.pos("GET", "/pointofsales", token, params={"merchantPosId": "nope"})
    assert none.json == {"posIds": []}
    unfiltered = await client.pos("GET", "/pointofsales", token)
    assert (unfiltered.status, unfiltered.json["code"]) == (400, "1121")


async def test_generated_beacon_id_is_15_digits(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token, beaconId=None)
    beacon_id = (await client.pos("GET", f"/pointofsales/{pos_id}", token)).json["beaconId"]
    assert len(beacon_id) == 15
    assert beacon_id.isdigit()


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"merchantPosId": ""}, 400, "1111"),
        ({"merchantPosId": "x" * 37}, 400, "1111"),
        ({"name": None}, 400, "1112"),
        ({"beaconId": "12345"}, 400, "1100"),
        ({"callbackAlias": 5}, 400, "1116"),
        ({"supportedBeaconTypes": ["Smoke"]}, 400, "1099"),
        ({"supportedBeaconTypes": []}, 400, "1099"),
        ({"storeId": str(uuid.uuid4())}, 409, "1002"),
    ],
)
async def test_create_point_of_sale_validation(
    client: SandboxClient, token: str, fields: dict[str, object], status: int, code: str
) -> None:
    body = {
        "merchantPosId": "pos-1",
        "storeId": await client.first_store(token),
        "name": "Register",
        "supportedBeaconTypes": ["QR"],
        **fields,
    }
    answer = await client.pos("POST", "/pointofsales", token, json_body=body, key=new_key())
    assert (answer.status, answer.json["code"]) == (status, code)


async def test_duplicates_conflict(client: SandboxClient, token: str) -> None:
    _, beacon_id = await client.create_pos(token, merchantPosId="dup")
    store_id = await client.first_store(token)
    body = {"storeId": store_id, "name": "x", "supportedBeaconTypes": ["QR"]}
    same_id = await client.pos(
        "POST", "/pointofsales", token, json_body={**body, "merchantPosId": "dup"}, key=new_key()
    )
    assert (same_id.status, same_id.json["code"]) == (409, "1200")
    same_beacon = await client.pos(
        "POST",
        "/pointofsales",
        token,
        json_body={**body, "merchantPosId": "other", "beaconId": beacon_id},
        key=new_key(),
    )
    assert (same_beacon.status, same_beacon.json["code"]) == (409, "1202")


async def test_other_merchants_points_of_sale_are_403(client: SandboxClient, token: str) -> None:
    other_token = await client.token(OTHER_VAT)
    pos_id, _ = await client.create_pos(other_token)
    for method, path, code in [
        ("GET", f"/pointofsales/{pos_id}", "1410"),
        ("DELETE", f"/pointofsales/{pos_id}", "1409"),
        ("GET", f"/pointofsales/{pos_id}/checkin", "1400"),
    ]:
        answer = await client.pos(method, path, token)
        assert (answer.status, answer.json["code"]) == (403, code)
    other_store = await client.first_store(other_token)
    body = {
        "merchantPosId": "p",
        "storeId": other_store,
        "name": "n",
        "supportedBeaconTypes": ["QR"],
    }
    answer = await client.pos("POST", "/pointofsales", token, json_body=body, key=new_key())
    assert (answer.status, answer.json["code"]) == (403, "1403")
    found = await client.pos("GET", "/pointofsales", token, params={"storeId": other_store})
    assert found.json == {"posIds": []}


async def test_delete_point_of_sale(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    deleted = await client.pos("DELETE", f"/pointofsales/{pos_id}", token)
    assert (deleted.status, deleted.raw) == (200, b"")
    gone = await client.pos("GET", f"/pointofsales/{pos_id}", token)
    assert (gone.status, gone.raw) == (404, b"")
    assert (await client.pos("DELETE", f"/pointofsales/{pos_id}", token)).status == 404
    assert (await client.payment(token, payment_id))["status"] == "CancelledByMobilePay"


async def test_checkin_reports_the_user(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    path = f"/pointofsales/{pos_id}/checkin"
    assert (await client.pos("GET", path, token)).json == {
        "isUserCheckedIn": False,
        "pollDelayInMs": 10,
    }
    assert (await client.user("checkin", beacon_id, "+4520031804")).status == 200
    checkin = (await client.pos("GET", path, token)).json
    assert checkin["isUserCheckedIn"] is True
    assert checkin["loyaltyIds"] == ["123456"]
    assert len(checkin["customerToken"]) == 40


async def test_json_body_is_required(client: SandboxClient, token: str) -> None:
    headers = client.pos_headers(token, idempotency_key=new_key())
    text = await client.request("POST", "/pos/v10/pointofsales", headers=headers, data=b"{}")
    assert (text.status, text.raw) == (415, b"")
    broken = await client.request(
        "POST",
        "/pos/v10/pointofsales",
        headers={**headers, "Content-Type": "application/json"},
        data=b"{not json",
    )
    assert (broken.status, broken.json["code"]) == (400, "1099")
