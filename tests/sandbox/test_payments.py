"""Payments: both flows, the user's part, capture, cancel, and their conflicts."""

from __future__ import annotations

import uuid

import pytest

from .conftest import OTHER_VAT, FakeClock, SandboxClient, new_key, payment_body


async def test_happy_path_to_captured(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id, 12.5)
    payment = await client.payment(token, payment_id)
    assert payment["status"] == "Initiated"
    assert payment["pollDelayInMs"] == 10
    assert payment["amount"] == 12.5
    assert payment["customerToken"] is None
    assert "partialCapturePossible" not in payment
    assert "loyaltyIds" not in payment

    assert (await client.user("checkin", beacon_id, "+4520031803")).status == 200
    assert (await client.payment(token, payment_id))["status"] == "Paired"
    issued = await client.payment(token, payment_id)
    assert issued["status"] == "IssuedToUser"
    assert issued["customerReceiptToken"]
    assert issued["loyaltyIds"] == []

    assert (await client.user("acceptpayment", beacon_id, "+4520031803")).status == 200
    reserved = await client.payment(token, payment_id)
    assert reserved["status"] == "Reserved"
    assert reserved["partialCapturePossible"] is False

    capture = await client.pos(
        "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": 12.5}
    )
    assert (capture.status, capture.raw) == (200, b"")
    assert (await client.payment(token, payment_id))["status"] == "Captured"
    again = await client.pos(
        "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": 12.5}
    )
    assert again.status == 200
    different = await client.pos(
        "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": 10}
    )
    assert (different.status, different.json["code"]) == (409, "1307")


async def test_accept_without_checkin_and_finnish_user(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    assert (await client.user("acceptpayment", beacon_id, "+358200318002")).status == 200
    assert (await client.payment(token, payment_id))["status"] == "Reserved"


async def test_prepare_then_ready(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    prepared = await client.pos(
        "POST",
        "/payments/prepare",
        token,
        json_body={"posId": pos_id, "orderId": "ORDER-1"},
        key=new_key(),
    )
    payment_id = prepared.json["paymentId"]
    payment = await client.payment(token, payment_id)
    assert (payment["status"], payment["amount"], payment["currencyCode"]) == (
        "Prepared",
        None,
        None,
    )
    # The user can check in while the amount is not known yet, but not pay.
    assert (await client.user("checkin", beacon_id, "+4520031801")).status == 200
    assert (await client.user("acceptpayment", beacon_id, "+4520031801")).status == 400

    ready_body = {"amount": 20, "currencyCode": "DKK", "plannedCaptureDelay": "LessThan24Hours"}
    bad = await client.pos(
        "POST", f"/payments/{payment_id}/ready", token, json_body={**ready_body, "amount": -1}
    )
    assert (bad.status, bad.json["code"]) == (400, "1102")
    assert (await client.payment(token, payment_id))["amount"] is None
    ready = await client.pos("POST", f"/payments/{payment_id}/ready", token, json_body=ready_body)
    assert ready.status == 200
    payment = await client.payment(token, payment_id)
    assert (payment["status"], payment["amount"]) == ("Paired", 20)
    twice = await client.pos("POST", f"/payments/{payment_id}/ready", token, json_body=ready_body)
    assert (twice.status, twice.json["code"]) == (409, "1303")


async def test_partial_capture_needs_a_user_that_allows_it(
    client: SandboxClient, token: str
) -> None:
    partial = await client.reserved_payment(token, 100, phone_number="+4520031805")
    assert (await client.payment(token, partial))["partialCapturePossible"] is True
    over = await client.pos(
        "POST", f"/payments/{partial}/capture", token, json_body={"amount": 100.01}
    )
    assert (over.status, over.json["code"]) == (409, "1305")
    ok = await client.pos("POST", f"/payments/{partial}/capture", token, json_body={"amount": 60})
    assert ok.status == 200
    assert (await client.payment(token, partial))["status"] == "Captured"

    full_only = await client.reserved_payment(token, 100, phone_number="+4520031801")
    refused = await client.pos(
        "POST", f"/payments/{full_only}/capture", token, json_body={"amount": 60}
    )
    assert (refused.status, refused.json["code"]) == (409, "1308")


@pytest.mark.parametrize("amount", [0, -5, 1.234, "12", True, None])
async def test_capture_amount_validation(client: SandboxClient, token: str, amount: object) -> None:
    payment_id = await client.reserved_payment(token)
    answer = await client.pos(
        "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": amount}
    )
    assert (answer.status, answer.json["code"]) == (400, "1102")


async def test_capture_before_reserved_conflicts(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    answer = await client.pos(
        "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": 12.5}
    )
    assert (answer.status, answer.json["code"]) == (409, "1304")


async def test_one_active_payment_per_point_of_sale(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    first = await client.initiate(token, pos_id)
    second = await client.pos(
        "POST", "/payments", token, json_body=payment_body(pos_id), key=new_key()
    )
    assert (second.status, second.json["code"]) == (409, "1301")
    prepare = await client.pos(
        "POST",
        "/payments/prepare",
        token,
        json_body={"posId": pos_id, "orderId": "o"},
        key=new_key(),
    )
    assert (prepare.status, prepare.json["code"]) == (409, "1301")
    # A reserved payment is no longer active.
    assert (await client.user("acceptpayment", beacon_id, "+4520031801")).status == 200
    assert (await client.payment(token, first))["status"] == "Reserved"
    await client.initiate(token, pos_id)


async def test_cancel_by_client(client: SandboxClient, token: str) -> None:
    pos_id, _ = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    cancel = await client.pos("POST", f"/payments/{payment_id}/cancel", token)
    assert (cancel.status, cancel.raw) == (200, b"")
    assert (await client.payment(token, payment_id))["status"] == "CancelledByClient"
    assert (await client.pos("POST", f"/payments/{payment_id}/cancel", token)).status == 200
    await client.initiate(token, pos_id)

    reserved = await client.reserved_payment(token)
    assert (await client.pos("POST", f"/payments/{reserved}/cancel", token)).status == 200
    captured = await client.captured_payment(token)
    refused = await client.pos("POST", f"/payments/{captured}/cancel", token)
    assert (refused.status, refused.json["code"]) == (409, "1300")


async def test_cancel_by_user(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    assert (await client.user("checkin", beacon_id, "+4520031802")).status == 200
    assert (await client.user("cancelpaymentbyuser", beacon_id, None)).status == 200
    assert (await client.payment(token, payment_id))["status"] == "CancelledByUser"
    nothing = await client.user("cancelpaymentbyuser", beacon_id, None)
    assert (nothing.status, nothing.json["code"]) == (400, "1099")


async def test_user_simulation_rejects_unknown_beacons_and_phones(
    client: SandboxClient, token: str
) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    await client.initiate(token, pos_id)
    assert (await client.user("checkin", str(uuid.uuid4()), "+4520031801")).status == 400
    assert (await client.user("checkin", beacon_id, "+4512345678")).status == 400
    assert (await client.user("checkin", beacon_id, "+4520031806")).status == 400
    assert (await client.user("checkin", beacon_id, "+4520031801")).status == 200
    other_user = await client.user("acceptpayment", beacon_id, "+4520031802")
    assert other_user.status == 400


async def test_payment_expires_when_the_user_never_accepts(
    client: SandboxClient, token: str, clock: FakeClock
) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    payment_id = await client.initiate(token, pos_id)
    clock.advance(301)
    assert (await client.payment(token, payment_id))["status"] == "ExpiredAndCancelled"
    assert (await client.user("acceptpayment", beacon_id, "+4520031801")).status == 400
    await client.initiate(token, pos_id)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"amount": 0}, "1102"),
        ({"amount": 1.001}, "1102"),
        ({"orderId": ""}, "1113"),
        ({"orderId": "o" * 37}, "1113"),
        ({"merchantPaymentLabel": "<script>"}, "1117"),
        ({"currencyCode": "SEK"}, "1099"),
        ({"plannedCaptureDelay": "Later"}, "1099"),
        ({"restrictions": {"debitCardDisallowed": "yes"}}, "1099"),
        ({"posId": "not-a-guid"}, "1099"),
    ],
)
async def test_initiate_validation(
    client: SandboxClient, token: str, fields: dict[str, object], code: str
) -> None:
    pos_id, _ = await client.create_pos(token)
    body = {**payment_body(pos_id), **fields}
    answer = await client.pos("POST", "/payments", token, json_body=body, key=new_key())
    assert (answer.status, answer.json["code"]) == (400, code)


async def test_initiate_on_unknown_or_foreign_point_of_sale(
    client: SandboxClient, token: str
) -> None:
    unknown = await client.pos(
        "POST", "/payments", token, json_body=payment_body(str(uuid.uuid4())), key=new_key()
    )
    assert (unknown.status, unknown.json["code"]) == (409, "1000")
    foreign_pos, _ = await client.create_pos(await client.token(OTHER_VAT))
    foreign = await client.pos(
        "POST", "/payments", token, json_body=payment_body(foreign_pos), key=new_key()
    )
    assert (foreign.status, foreign.json["code"]) == (403, "1400")


async def test_other_merchants_payments_are_403(client: SandboxClient, token: str) -> None:
    payment_id = await client.reserved_payment(await client.token(OTHER_VAT))
    for method, path, body, code in [
        ("GET", f"/payments/{payment_id}", None, "1411"),
        ("POST", f"/payments/{payment_id}/capture", {"amount": 12.5}, "1407"),
        ("POST", f"/payments/{payment_id}/cancel", None, "1408"),
        (
            "POST",
            f"/payments/{payment_id}/ready",
            {"amount": 1, "currencyCode": "DKK", "plannedCaptureDelay": "None"},
            "1406",
        ),
    ]:
        answer = await client.pos(method, path, token, json_body=body)
        assert (answer.status, answer.json["code"]) == (403, code), path


async def test_unknown_payments_are_404_with_empty_body(client: SandboxClient, token: str) -> None:
    for method, path in [
        ("GET", f"/payments/{uuid.uuid4()}"),
        ("GET", "/payments/not-a-guid"),
        ("POST", f"/payments/{uuid.uuid4()}/cancel"),
    ]:
        answer = await client.pos(method, path, token)
        assert (answer.status, answer.raw) == (404, b"")


async def test_query_payments_by_filter(client: SandboxClient, token: str) -> None:
    pos_id, beacon_id = await client.create_pos(token)
    body = payment_body(pos_id, orderId="ORDER-42")
    active = (await client.pos("POST", "/payments", token, json_body=body, key=new_key())).json[
        "paymentId"
    ]
    by_pos = await client.pos("GET", "/payments", token, params={"posId": pos_id})
    assert by_pos.json == {"paymentIds": [active]}
    by_order = await client.pos("GET", "/payments", token, params={"orderId": "ORDER-42"})
    assert by_order.json == {"paymentIds": [active]}
    captured = await client.pos(
        "GET", "/payments", token, params={"posId": pos_id, "state": "Captured"}
    )
    assert captured.json == {"paymentIds": []}

    await client.user("acceptpayment", beacon_id, "+4520031801")
    await client.pos("POST", f"/payments/{active}/capture", token, json_body={"amount": 12.5})
    assert (await client.pos("GET", "/payments", token, params={"posId": pos_id})).json == {
        "paymentIds": []
    }
    captured = await client.pos(
        "GET", "/payments", token, params={"posId": pos_id, "state": "Captured"}
    )
    assert captured.json == {"paymentIds": [active]}

    vague = await client.pos("GET", "/payments", token, params={"state": "Captured"})
    assert (vague.status, vague.json["code"]) == (400, "1109")
    other = await client.pos(
        "GET", "/payments", await client.token(OTHER_VAT), params={"posId": pos_id}
    )
    assert other.json == {"paymentIds": []}
