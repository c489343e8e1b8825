"""RS256 JSON Web Tokens, signed and verified the way the token service does it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TOKEN_TYPE = "at+jwt"
ALGORITHM = "RS256"


class JwtError(Exception):
    """The token is malformed, badly signed or not valid at this time."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError("invalid base64url") from exc


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _json_segment(segment: str) -> dict[str, Any]:
    try:
        decoded = json.loads(b64url_decode(segment))
    except (UnicodeDecodeError, ValueError) as exc:
        raise JwtError("segment is not JSON") from exc
    if not isinstance(decoded, dict):
        raise JwtError("segment is not a JSON object")
    return decoded


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWT, without checking anything."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three segments")
    return _json_segment(parts[0]), _json_segment(parts[1])


class TokenSigner:
    """An RSA key pair that signs and verifies access tokens."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key()
        numbers = self._public_key.public_numbers()
        # RFC 7638 thumbprint, so the kid changes whenever the key does.
        canonical = json.dumps(
            {"e": b64url_encode(_int_bytes(numbers.e)), "kty": "RSA", "n": self._n()},
            separators=(",", ":"),
            sort_keys=True,
        )
        self.kid = b64url_encode(hashlib.sha256(canonical.encode()).digest())

    @classmethod
    def generate(cls) -> TokenSigner:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def _n(self) -> str:
        return b64url_encode(_int_bytes(self._public_key.public_numbers().n))

    def public_jwk(self) -> dict[str, str]:
        numbers = self._public_key.public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": ALGORITHM,
            "kid": self.kid,
            "e": b64url_encode(_int_bytes(numbers.e)),
            "n": self._n(),
        }

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": self.kid}
        signing_input = ".".join(
            b64url_encode(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims)
        )
        signature = self._private_key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{b64url_encode(signature)}"

    def verify(self, token: str, *, now: float, audience: str, issuer: str) -> dict[str, Any]:
        """The token's claims, if this key signed it and it is valid at ``now``."""
        header, claims = decode_unverified(token)
        if header.get("alg") != ALGORITHM or header.get("kid") != self.kid:
            raise JwtError("unexpected algorithm or key id")
        signing_input, _, signature = token.rpartition(".")
        try:
            self._public_key.verify(
                b64url_decode(signature),
                signing_input.encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, UnicodeEncodeError) as exc:
            raise JwtError("bad signature") from exc
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int) or not isinstance(nbf, int):
            raise JwtError("exp and nbf must be integers")
        if now >= exp:
            raise JwtError("expired")
        if now < nbf:
            raise JwtError("not yet valid")
        if claims.get("aud") != audience or claims.get("iss") != issuer:
            raise JwtError("wrong audience or issuer")
        return claims
