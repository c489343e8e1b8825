"""What the PoS API demands before it looks at a call: a valid token and the headers."""

from __future__ import annotations

import pytest

from proxy.sandbox.jwt import TokenSigner, decode_unverified

from .conftest import (
    IBM_CLIENT_ID,
    OTHER_VAT,
    VAT,
    VERSION,
    Answer,
    FakeClock,
    SandboxClient,
    StartSandbox,
)

STORES = "/pos/v10/stores/detailed"


def assert_empty_401(answer: Answer) -> None:
    assert answer.status == 401, answer
    assert answer.raw == b""


async def test_valid_token_is_accepted(client: SandboxClient, token: str) -> None:
    answer = await client.request("GET", STORES, headers=client.pos_headers(token))
    assert answer.status == 200
    assert len(answer.json) == 3


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer ", "Basic abc", "Bearer not.a.jwt", "Bearer a.b", "Bearer ...."],
)
async def test_missing_or_malformed_token_is_401_with_empty_body(
    client: SandboxClient, token: str, authorization: str | None
) -> None:
    headers = client.pos_headers(token)
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    answer = await client.request("GET", STORES, headers=headers)
    assert_empty_401(answer)
    assert answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("ibm_client_id", [None, "other", ""])
async def test_ibm_client_id_is_required(
    client: SandboxClient, token: str, ibm_client_id: str | None
) -> None:
    headers = client.pos_headers(token)
    del headers["X-IBM-Client-Id"]
    if ibm_client_id is not None:
        headers["X-IBM-Client-Id"] = ibm_client_id
    assert_empty_401(await client.request("GET", STORES, headers=headers))


async def test_expired_token_is_401(client: SandboxClient, token: str, clock: FakeClock) -> None:
    _, claims = decode_unverified(token)
    clock.advance(claims["exp"] - claims["iat"] - 1)
    assert (await client.request("GET", STORES, headers=client.pos_headers(token))).status == 200
    clock.advance(1)
    assert_empty_401(await client.request("GET", STORES, headers=client.pos_headers(token)))


async def test_badly_signed_token_is_401(client: SandboxClient, token: str) -> None:
    header, claims = decode_unverified(token)
    forger = TokenSigner.generate()
    forger.kid = header["kid"]
    forged = forger.sign(claims)
    assert_empty_401(await client.request("GET", STORES, headers=client.pos_headers(forged)))

    tampered_claims = {**claims, "merchant_vat": OTHER_VAT}
    genuine_header, _, signature = token.split(".")
    tampered_payload = forger.sign(tampered_claims).split(".")[1]
    tampered = f"{genuine_header}.{tampered_payload}.{signature}"
    assert_empty_401(await client.request("GET", STORES, headers=client.pos_headers(tampered)))


async def test_token_of_another_sandbox_is_401(
    client: SandboxClient, start_sandbox: StartSandbox
) -> None:
    other = await start_sandbox(key=TokenSigner.generate())
    foreign = await other.token()
    assert_empty_401(await client.request("GET", STORES, headers=client.pos_headers(foreign)))


async def test_token_for_another_merchant_is_401(client: SandboxClient, token: str) -> None:
    headers = client.pos_headers(token, vat=OTHER_VAT)
    assert_empty_401(await client.request("GET", STORES, headers=headers))
    same = await client.request("GET", STORES, headers=client.pos_headers(token, vat=VAT))
    assert same.status == 200


async def test_token_without_vat_claim_uses_the_header(client: SandboxClient) -> None:
    token = await client.token(vat=None)
    missing = await client.request("GET", STORES, headers=client.pos_headers(token))
    assert missing.status == 400
    assert missing.json["code"] == "1151"
    answer = await client.request("GET", STORES, headers=client.pos_headers(token, vat=OTHER_VAT))
    assert answer.status == 200
    assert {store["brandName"] for store in answer.json} == {f"Demo Brand {OTHER_VAT}"}


async def test_revoked_tokens_are_401_until_a_new_one_is_fetched(
    client: SandboxClient, token: str
) -> None:
    assert (await client.admin("POST", "/revoke-tokens")) == {"revoked": 1}
    assert_empty_401(await client.request("GET", STORES, headers=client.pos_headers(token)))
    fresh = await client.token()
    assert (await client.request("GET", STORES, headers=client.pos_headers(fresh))).status == 200


@pytest.mark.parametrize(
    ("version", "code"),
    [(None, "1153"), ("1.2", "1160"), ("v1.2.3", "1160"), ("1.2.3.4", "1160"), ("", "1160")],
)
async def test_client_system_version_is_required(
    client: SandboxClient, token: str, version: str | None, code: str
) -> None:
    headers = client.pos_headers(token)
    del headers["X-MobilePay-Client-System-Version"]
    if version is not None:
        headers["X-MobilePay-Client-System-Version"] = version
    answer = await client.request("GET", STORES, headers=headers)
    assert answer.status == 400
    body = answer.json
    assert body.keys() == {"code", "message", "correlationId"}
    assert body["code"] == code


async def test_duplicated_headers_are_400(client: SandboxClient, token: str) -> None:
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-IBM-Client-Id", IBM_CLIENT_ID),
        ("X-MobilePay-Client-System-Version", VERSION),
        ("X-MobilePay-Client-System-Version", VERSION),
    ]
    answer = await client.request("GET", STORES, headers=headers)
    assert (answer.status, answer.json["code"]) == (400, "1157")
    vat_twice = [*headers[:3], *[("X-MobilePay-Merchant-VAT-Number", VAT)] * 2]
    answer = await client.request("GET", STORES, headers=vat_twice)
    assert (answer.status, answer.json["code"]) == (400, "1155")
    bad_vat = [*headers[:3], ("X-MobilePay-Merchant-VAT-Number", "DK1")]
    answer = await client.request("GET", STORES, headers=bad_vat)
    assert (answer.status, answer.json["code"]) == (400, "1159")
