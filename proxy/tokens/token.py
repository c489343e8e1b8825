"""The token value object and the rules for how long a token may be used."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field

# A token endpoint that claims a lifetime longer than this is not believed.
MAX_LIFETIME_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Token:
    """An access token for one merchant VAT; times are on the monotonic clock."""

    value: str = field(repr=False)
    vat: str
    generation: int
    obtained_at: float
    refresh_at: float
    expires_at: float
    wall_expires_at: float
    fingerprint: str


def fingerprint(value: str) -> str:
    """A short, non-reversible name for a token, safe to log."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def jwt_lifetime(value: str) -> float | None:
    """Seconds between the JWT's ``iat`` and ``exp`` claims, if the token is a JWT with both.

    The claims are read, not verified: the proxy only uses them to avoid holding a
    token longer than its issuer intends. ``exp - iat`` is on the issuer's clock,
    so the local clock's skew does not matter.
    """
    parts = value.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp, iat = payload["exp"], payload["iat"]
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exp, iat)):
        return None
    return _finite(exp - iat)


def _finite(value: int | float) -> float | None:
    """The value as a finite float; None for NaN, infinities and ints too large for a float
    (JSON allows ``exp: 1e400``, Python's parser also ``NaN`` and ``Infinity``)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def usable_lifetime(expires_in: object, value: str) -> float | None:
    """The lifetime to trust: the earlier of ``expires_in`` and the JWT's own, capped.

    ``None`` when neither gives a positive lifetime.
    """
    candidates = []
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        from_response = _finite(expires_in)
        if from_response is not None:
            candidates.append(from_response)
    from_jwt = jwt_lifetime(value)
    if from_jwt is not None:
        candidates.append(from_jwt)
    if not candidates:
        return None
    lifetime = min(candidates)
    if lifetime <= 0:
        return None
    return min(lifetime, MAX_LIFETIME_SECONDS)
