"""All I/O towards MobilePay: one session, one TLS context, errors mapped at this boundary."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import MobilePayConfig, UpstreamConfig
from proxy.errors import ProxyError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)


def tls_context(config: MobilePayConfig) -> ssl.SSLContext:
    """System trust plus the configured extra CA; verification is never turned off."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context


def create_session(mobilepay: MobilePayConfig, upstream: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        ssl=tls_context(mobilepay),
        limit=upstream.max_connections,
        limit_per_host=upstream.max_connections,
        keepalive_timeout=upstream.keepalive_timeout_seconds,
        ttl_dns_cache=60,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=upstream.timeout_seconds, connect=upstream.connect_timeout_seconds
        ),
        auto_decompress=False,
        # Terminals' cookies must never mix; MobilePay's API sets none anyway.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Relay what the terminal asked for, not what aiohttp would add on its own.
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        trust_env=False,
    )
    # aiohttp silently resends GET, PUT and DELETE once after a dropped connection. Which
    # requests may be resent is a money question here, decided in one place
    # (forwarding._safe_to_resend), so aiohttp's own resend is switched off.
    session._retry_connection = False
    return session


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes


class RetryableFailure(Exception):
    """The connection failed before any byte of a response arrived."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.code)
        self.error = error


class UpstreamClient:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def send(
        self, method: str, url: URL, headers: CIMultiDict[str], body: bytes
    ) -> UpstreamResponse:
        """One attempt. Raises RetryableFailure when no response byte arrived, else ProxyError."""
        try:
            response = await self._session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientSSLError:
            raise UpstreamUnreachable(
                "MobilePay's TLS certificate could not be verified."
            ) from None
        except aiohttp.ClientResponseError as exc:
            # Never format exc: aiohttp's repr of a request error carries its headers.
            log.warning(
                "upstream %s %s sent a malformed response: %s", method, url.path, type(exc).__name__
            )
            raise UpstreamBadResponse() from None
        except aiohttp.ClientConnectionError as exc:
            log.warning(
                "upstream %s %s failed before a response: %s", method, url.path, type(exc).__name__
            )
            raise RetryableFailure(UpstreamUnreachable()) from None
        try:
            async with response:
                payload = await response.read()
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError as exc:
            log.warning(
                "upstream %s %s broke off mid-response: %s", method, url.path, type(exc).__name__
            )
            raise UpstreamBadResponse() from None
        return UpstreamResponse(response.status, response.reason, response.headers, payload)
