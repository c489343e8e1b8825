"""The token service: client checks, form checks, and the JWT it issues."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proxy.sandbox.jwt import b64url_decode, decode_unverified

from .conftest import CLIENT_ID, IBM_CLIENT_ID, VAT, SandboxClient, StartSandbox, basic


@pytest.mark.parametrize(
    "authorization",
    [
        basic(secret="wrong-secret"),
        basic(client_id="someone-else"),
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic not-base64!",
        "Bearer abc",
    ],
)
async def test_bad_basic_credentials_are_invalid_client(
    client: SandboxClient, authorization: str
) -> None:
    answer = await client.token_answer(authorization=authorization)
    assert answer.status == 401
    assert answer.json == {"error": "invalid_client"}


@pytest.mark.parametrize("ibm_client_id", [None, "other-ibm-client", CLIENT_ID])
async def test_ibm_client_id_must_match(client: SandboxClient, ibm_client_id: str | None) -> None:
    answer = await client.token_answer(ibm_client_id=ibm_client_id)
    assert answer.status == 401
    assert answer.json == {"error": "invalid_client"}


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({}, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "merchant_vat": "DK1234567"}, "invalid_request"),
        ({"grant_type": "client_credentials", "merchant_vat": "SE12345678"}, "invalid_request"),
        ({"grant_type": "client_credentials", "merchant_vat": "dk12345678"}, "invalid_request"),
    ],
)
async def test_bad_form_is_400(client: SandboxClient, form: dict[str, str], error: str) -> None:
    answer = await client.token_answer(form)
    assert answer.status == 400
    assert answer.json == {"error": error}


async def test_only_form_encoding_is_accepted(client: SandboxClient) -> None:
    answer = await client.request(
        "POST",
        "/integrator-authentication/connect/token",
        headers={"Authorization": basic(), "X-IBM-Client-Id": IBM_CLIENT_ID},
        json_body={"grant_type": "client_credentials"},
    )
    assert answer.status == 400
    assert answer.json == {"error": "invalid_request"}


async def test_token_response_and_claims(start_sandbox: StartSandbox) -> None:
    client = await start_sandbox(token_lifetime_seconds=1234)
    answer = await client.token_answer(
        {"grant_type": "client_credentials", "merchant_vat": "FI12345678"}
    )
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json
    assert body.keys() == {"access_token", "expires_in", "token_type", "scope"}
    assert body["expires_in"] == 1334
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "integrator_scope"

    header, claims = decode_unverified(body["access_token"])
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": client.sandbox.signer.kid}
    assert list(claims) == [
        "nbf",
        "exp",
        "iat",
        "iss",
        "aud",
        "client_id",
        "merchant_vat",
        "scope",
        "jti",
    ]
    assert claims["exp"] - claims["iat"] == 1234
    assert claims["nbf"] == claims["iat"]
    assert claims["client_id"] == CLIENT_ID
    assert claims["merchant_vat"] == "FI12345678"


async def test_token_without_vat_has_no_merchant_claim(client: SandboxClient) -> None:
    _, claims = decode_unverified(await client.token(vat=None))
    assert "merchant_vat" not in claims


async def test_tokens_verify_against_the_published_jwks(client: SandboxClient) -> None:
    token = await client.token()
    jwks = await client.request(
        "GET",
        "/integrator-authentication/.well-known/openid-configuration/jwks",
        headers={"X-IBM-Client-Id": IBM_CLIENT_ID},
    )
    assert jwks.status == 200
    (jwk,) = jwks.json["keys"]
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(jwk["e"]), "big"),
        int.from_bytes(b64url_decode(jwk["n"]), "big"),
    ).public_key()
    signing_input, _, signature = token.rpartition(".")
    public_key.verify(
        b64url_decode(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )


async def test_discovery_needs_the_ibm_client_id(client: SandboxClient) -> None:
    path = "/integrator-authentication/.well-known/openid-configuration"
    assert (await client.request("GET", path)).status == 401
    answer = await client.request("GET", path, headers={"X-IBM-Client-Id": IBM_CLIENT_ID})
    assert answer.status == 200
    assert answer.json["token_endpoint"] == str(
        client.url.with_path("/integrator-authentication/connect/token")
    )


async def test_stats_count_token_requests_per_vat(client: SandboxClient) -> None:
    await client.token()
    await client.token()
    await client.token(vat="FI11112222")
    await client.token(vat=None)
    await client.token_answer(authorization=basic(secret="nope"))
    stats = await client.admin("GET", "/stats")
    assert stats["token_requests"] == {
        "total": 5,
        "issued": 4,
        "by_merchant_vat": {VAT: 2, "FI11112222": 1},
    }


async def test_form_encoded_basic_credentials_are_accepted(start_sandbox: StartSandbox) -> None:
    client = await start_sandbox(client_id="id with space", client_secret="s&cret+")
    raw = await client.token_answer(authorization=basic("id with space", "s&cret+"))
    assert raw.status == 200
    encoded = await client.token_answer(authorization=basic("id+with+space", "s%26cret%2B"))
    assert encoded.status == 200


async def test_request_log_hides_the_client_secret(client: SandboxClient) -> None:
    await client.token()
    (seen,) = await client.admin("GET", "/requests")
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert headers["authorization"] == "Basic <redacted>"
