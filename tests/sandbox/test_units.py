"""Pure pieces, without a network: JWTs, fault dice, request fingerprints."""

from __future__ import annotations

import random

import pytest

from proxy.sandbox.control import Faults
from proxy.sandbox.jwt import JwtError, TokenSigner, b64url_encode
from proxy.sandbox.settings import FaultSettings
from proxy.sandbox.state import SANDBOX_USERS, UserKind, fingerprint, parse_idempotency_key

CLAIMS = {"nbf": 1000, "exp": 2000, "iat": 1000, "iss": "iss", "aud": "aud", "jti": "x"}


def test_jwt_round_trip(signer: TokenSigner) -> None:
    token = signer.sign(CLAIMS)
    assert signer.verify(token, now=1500, audience="aud", issuer="iss") == CLAIMS


@pytest.mark.parametrize(
    ("now", "audience", "issuer"),
    [(999, "aud", "iss"), (2000, "aud", "iss"), (1500, "other", "iss"), (1500, "aud", "other")],
)
def test_jwt_validity(signer: TokenSigner, now: float, audience: str, issuer: str) -> None:
    with pytest.raises(JwtError):
        signer.verify(signer.sign(CLAIMS), now=now, audience=audience, issuer=issuer)


def test_jwt_alg_none_is_refused(signer: TokenSigner) -> None:
    header = b64url_encode(b'{"alg":"none","kid":"%s"}' % signer.kid.encode())
    payload = signer.sign(CLAIMS).split(".")[1]
    with pytest.raises(JwtError):
        signer.verify(f"{header}.{payload}.", now=1500, audience="aud", issuer="iss")


def test_faults_next_counts_down_and_every_repeats() -> None:
    faults = Faults(FaultSettings(unauthorized_next=1, unauthorized_every=2), random.Random(0))
    assert [faults.take_unauthorized() for _ in range(5)] == [True, True, False, True, False]
    faults.update({"unauthorized_every": 0})
    assert not any(faults.take_unauthorized() for _ in range(3))


def test_fault_updates_are_checked() -> None:
    faults = Faults(FaultSettings(), random.Random(0))
    with pytest.raises(ValueError, match="latency_ms"):
        faults.update({"latency_ms": 1.5})
    with pytest.raises(ValueError, match="error_rate"):
        faults.update({"error_rate": -0.1})
    assert faults.settings == FaultSettings()


def test_error_codes_are_in_the_documented_range() -> None:
    faults = Faults(FaultSettings(errors_next=50), random.Random(1))
    codes = {faults.take_error() for _ in range(50)}
    assert all(code is not None and 2000 <= int(code) <= 2999 for code in codes)
    assert faults.take_error() is None


def test_fingerprint_ignores_key_order_only() -> None:
    assert fingerprint("POST", "/p", {"a": 1, "b": 2}) == fingerprint(
        "POST", "/p", {"b": 2, "a": 1}
    )
    assert fingerprint("POST", "/p", {"a": 1}) != fingerprint("POST", "/q", {"a": 1})
    assert fingerprint("POST", "/p", {"a": 1}) != fingerprint("POST", "/p", {"a": 2})


def test_idempotency_key_rules() -> None:
    assert parse_idempotency_key(["k" * 36]) == "k" * 36


def test_sandbox_users() -> None:
    assert len(SANDBOX_USERS) == 10
    assert SANDBOX_USERS["+4520031801"].kind is UserKind.CREDIT
    assert SANDBOX_USERS["+358200318005"].kind is UserKind.PARTIAL_CAPTURE
