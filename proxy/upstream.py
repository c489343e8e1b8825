"""All I/O towards MobilePay, with errors mapped to the proxy's at this one boundary.

Forwarded requests go through the lean keep-alive pool in :mod:`proxy.http1`; the token
endpoint, called rarely, through one aiohttp session.
"""

from __future__ import annotations

import logging
import ssl

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import MobilePayConfig, UpstreamConfig
from proxy.errors import ProxyError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from proxy.http1 import BadResponse, ConnectionFailed, ConnectionPool, serialise_headers
from proxy.http1 import Response as UpstreamResponse

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


class RetryableFailure(Exception):
    """The connection failed before any byte of a response arrived."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.code)
        self.error = error


class UpstreamClient:
    """Forwards requests to MobilePay over a keep-alive pool, mapping every failure."""

    def __init__(self, mobilepay: MobilePayConfig, upstream: UpstreamConfig) -> None:
        self._pool = ConnectionPool(
            tls_context(mobilepay),
            limit=upstream.max_connections,
            connect_timeout=upstream.connect_timeout_seconds,
            keepalive_timeout=upstream.keepalive_timeout_seconds,
        )
        self._timeout = upstream.timeout_seconds

    def close(self) -> None:
        self._pool.close()

    async def send(
        self, method: str, url: URL, headers: CIMultiDict[str], body: bytes
    ) -> UpstreamResponse:
        """One attempt. Raises RetryableFailure when no response byte arrived, else ProxyError."""
        head = serialise_headers(method, url.host_port_subcomponent or "", headers, body)
        try:
            return await self._pool.request(method, url, head, body, self._timeout)
        except TimeoutError:
            raise UpstreamTimeout() from None
        except ssl.SSLCertVerificationError:
            raise UpstreamUnreachable(
                "MobilePay's TLS certificate could not be verified."
            ) from None
        except ConnectionFailed as exc:
            log.warning("upstream %s %s failed before a response: %s", method, url.path, exc)
            raise RetryableFailure(UpstreamUnreachable()) from None
        except BadResponse as exc:
            log.warning("upstream %s %s: unusable response: %s", method, url.path, exc)
            raise UpstreamBadResponse() from None
