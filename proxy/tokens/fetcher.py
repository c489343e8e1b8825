"""The one place that talks to MobilePay's token endpoint."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

from proxy.config import MobilePayConfig
from proxy.tokens.token import usable_lifetime

log = logging.getLogger(__name__)
# A token response is a few hundred bytes; anything far larger is not one.
MAX_RESPONSE_BYTES = 64 * 1024
# A Retry-After beyond this many digits is nonsense (and would not fit a float).
MAX_RETRY_AFTER_DIGITS = 9


class TokenFetchError(Exception):
    """A token could not be obtained. ``reason`` is safe to log; it never holds a secret."""

    def __init__(
        self, reason: str, *, retry_after: float | None = None, credentials: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.credentials = credentials


@dataclass(frozen=True, slots=True)
class FetchedToken:
    value: str = field(repr=False)
    lifetime: float


class TokenFetcher:
    """Obtains a merchant-bound token with the integrator's client credentials."""

    def __init__(
        self, session: aiohttp.ClientSession, config: MobilePayConfig, timeout: float
    ) -> None:
        self._session = session
        self._url = config.token_url
        basic = base64.b64encode(f"{config.client_id}:{config.client_secret}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {basic}",
            "x-ibm-client-id": config.ibm_client_id,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"TokenFetcher(url={str(self._url)!r})"

    async def fetch(self, vat: str) -> FetchedToken:
        form = urlencode({"grant_type": "client_credentials", "merchant_vat": vat}).encode()
        try:
            async with self._session.post(
                self._url,
                data=form,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                body = await _read_bounded(response)
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            raise TokenFetchError("the token endpoint timed out") from None
        except aiohttp.ClientSSLError:
            raise TokenFetchError("TLS verification of the token endpoint failed") from None
        except aiohttp.ClientConnectorError:
            raise TokenFetchError("the token endpoint could not be reached") from None
        except aiohttp.ClientError as exc:
            # Never format the exception itself: aiohttp's repr carries request headers.
            raise TokenFetchError(f"the token request failed ({type(exc).__name__})") from None
        return _parse(status, body, retry_after)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes | None:
    """The whole body, however many TLS records it came in; None when over the bound."""
    declared = response.content_length
    if declared is not None and declared > MAX_RESPONSE_BYTES:
        return None
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            return None
    return bytes(body)


def _parse(status: int, body: bytes | None, retry_after: float | None) -> FetchedToken:
    error = _error_code(body or b"")
    if status == 401 or error == "invalid_client":
        raise TokenFetchError(
            f"the token endpoint rejected the client credentials (HTTP {status})", credentials=True
        )
    if status != 200:
        detail = f", {error}" if error else ""
        raise TokenFetchError(
            f"the token endpoint answered HTTP {status}{detail}", retry_after=retry_after
        )
    if body is None:
        raise TokenFetchError("the token response is too large")
    try:
        payload = json.loads(body)
    except ValueError:
        raise TokenFetchError("the token response is not JSON") from None
    if not isinstance(payload, dict):
        raise TokenFetchError("the token response is not a JSON object")
    value = payload.get("access_token")
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise TokenFetchError("the token response has no usable access_token")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenFetchError("the token response is not a Bearer token")
    lifetime = usable_lifetime(payload.get("expires_in"), value)
    if lifetime is None:
        raise TokenFetchError("the token response has no positive expires_in")
    return FetchedToken(value=value, lifetime=lifetime)


def _error_code(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) <= 64:
        return error
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its delta-seconds form (ASCII digits only:
    ``str.isdigit`` also accepts ``²``, which ``float`` refuses); None for anything else."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_RETRY_AFTER_DIGITS:
        return None
    return float(value)
