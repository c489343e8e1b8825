"""Refunds of captured payments."""

from __future__ import annotations

import uuid
from typing import Any

from .conftest import OTHER_VAT, SandboxClient, new_key


def refund_body(payment_id: str, amount: float, **fields: Any) -> dict[str, Any]:
    return {
        "paymentId": payment_id,
        "refundOrderId": f"refund-{uuid.uuid4().hex[:8]}",
        "amount": amount,
        "currencyCode": "DKK",
        **fields,
    }


async def create_refund(client: SandboxClient, token: str, payment_id: str, amount: float) -> Any:
    return await client.pos(
        "POST", "/refunds", token, json_body=refund_body(payment_id, amount), key=new_key()
    )


async def test_refund_capture(client: SandboxClient, token: str) -> None:
    payment_id = await client.captured_payment(token, 20)
    created = await create_refund(client, token, payment_id, 5)
    assert created.status == 200
    refund_id = created.json["refundId"]
    refund = (await client.pos("GET", f"/refunds/{refund_id}", token)).json
    assert refund == {
        "refundId": refund_id,
        "paymentId": payment_id,
        "refundOrderId": refund["refundOrderId"],
        "amount": 5,
        "currencyCode": "DKK",
        "status": "Reserved",
        "pollDelayInMs": 10,
    }
    capture = await client.pos("POST", f"/refunds/{refund_id}/capture", token)
    assert (capture.status, capture.raw) == (200, b"")
    assert (await client.pos("GET", f"/refunds/{refund_id}", token)).json["status"] == "Captured"
    assert (await client.pos("POST", f"/refunds/{refund_id}/capture", token)).status == 200
    cancel = await client.pos("POST", f"/refunds/{refund_id}/cancel", token)
    assert (cancel.status, cancel.json["code"]) == (409, "1352")
    listed = await client.pos("GET", "/refunds", token, params={"paymentId": payment_id})
    assert listed.json == {"refundIds": [refund_id]}


async def test_refund_cancel_frees_the_amount(client: SandboxClient, token: str) -> None:
    payment_id = await client.captured_payment(token, 20)
    refund_id = (await create_refund(client, token, payment_id, 20)).json["refundId"]
    too_much = await create_refund(client, token, payment_id, 1)
    assert (too_much.status, too_much.json["code"]) == (409, "1367")
    cancel = await client.pos("POST", f"/refunds/{refund_id}/cancel", token)
    assert cancel.status == 200
    assert (await client.pos("GET", f"/refunds/{refund_id}", token)).json[
        "status"
    ] == "CancelledByClient"
    capture = await client.pos("POST", f"/refunds/{refund_id}/capture", token)
    assert (capture.status, capture.json["code"]) == (409, "1351")
    assert (await create_refund(client, token, payment_id, 20)).status == 200


async def test_refund_is_limited_to_the_captured_amount(client: SandboxClient, token: str) -> None:
    payment_id = await client.reserved_payment(token, 100, phone_number="+4520031805")
    await client.pos("POST", f"/payments/{payment_id}/capture", token, json_body={"amount": 30})
    assert (await create_refund(client, token, payment_id, 20)).status == 200
    over = await create_refund(client, token, payment_id, 10.01)
    assert (over.status, over.json["code"]) == (409, "1367")
    assert (await create_refund(client, token, payment_id, 10)).status == 200


async def test_refund_conflicts(client: SandboxClient, token: str) -> None:
    reserved = await client.reserved_payment(token)
    not_captured = await create_refund(client, token, reserved, 1)
    assert (not_captured.status, not_captured.json["code"]) == (409, "1354")
    unknown = await create_refund(client, token, str(uuid.uuid4()), 1)
    assert (unknown.status, unknown.json["code"]) == (409, "1001")
    captured = await client.captured_payment(token)
    euros = await client.pos(
        "POST",
        "/refunds",
        token,
        json_body=refund_body(captured, 1, currencyCode="EUR"),
        key=new_key(),
    )
    assert (euros.status, euros.json["code"]) == (409, "1365")
    bad_order = await client.pos(
        "POST",
        "/refunds",
        token,
        json_body=refund_body(captured, 1, refundOrderId=""),
        key=new_key(),
    )
    assert (bad_order.status, bad_order.json["code"]) == (400, "1114")
    vague = await client.pos("GET", "/refunds", token)
    assert (vague.status, vague.json["code"]) == (400, "1110")


async def test_other_merchants_refunds(client: SandboxClient, token: str) -> None:
    other_token = await client.token(OTHER_VAT)
    payment_id = await client.captured_payment(other_token)
    foreign_payment = await create_refund(client, token, payment_id, 1)
    assert (foreign_payment.status, foreign_payment.json["code"]) == (403, "1401")
    refund_id = (await create_refund(client, other_token, payment_id, 1)).json["refundId"]
    for method, path in [
        ("GET", f"/refunds/{refund_id}"),
        ("POST", f"/refunds/{refund_id}/capture"),
        ("POST", f"/refunds/{refund_id}/cancel"),
    ]:
        answer = await client.pos(method, path, token)
        assert (answer.status, answer.json["code"]) == (403, "1402")


async def test_unknown_refunds_are_404(client: SandboxClient, token: str) -> None:
    missing = str(uuid.uuid4())
    assert (await client.pos("GET", f"/refunds/{missing}", token)).raw == b""
    assert (await client.pos("GET", f"/refunds/{missing}", token)).status == 404
    cancel = await client.pos("POST", f"/refunds/{missing}/cancel", token)
    assert (cancel.status, cancel.raw) == (404, b"")
    # The error table gives only this 404 a code.
    capture = await client.pos("POST", f"/refunds/{missing}/capture", token)
    assert (capture.status, capture.json["code"]) == (404, "1004")
