"""All I/O towards MobilePay, with errors mapped to the proxy's at this one boundary.

Forwarded requests go through the lean keep-alive pool in :mod:`proxy.http1`; the token
endpoint, called rarely, through one aiohttp session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import MobilePayConfig, UpstreamConfig
from proxy.errors import (
    ProxyError,
    RequestDeadlineExceeded,
    UpstreamBadResponse,
    UpstreamBusy,
    UpstreamConnectTimeout,
    UpstreamSendTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.http1 import BadResponse, ConnectionFailed, ConnectionPool, Timeout, serialise_headers
from proxy.http1 import Response as UpstreamResponse
from proxy.metrics import Metrics

log = logging.getLogger(__name__)


def tls_context(config: MobilePayConfig) -> ssl.SSLContext:
    """System trust plus the configured extra CA; verification is never turned off."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context


def create_session(mobilepay: MobilePayConfig, upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """The session for the token endpoint.

    It only POSTs, which aiohttp never resends on its own (it resends only idempotent
    methods after a dropped keep-alive connection): which requests may be sent twice is
    decided in one place, forwarding.
    """
    connector = aiohttp.TCPConnector(
        ssl=tls_context(mobilepay),
        limit=upstream.max_connections,
        limit_per_host=upstream.max_connections,
        keepalive_timeout=upstream.keepalive_timeout_seconds,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
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


class RetryableFailure(Exception):
    """The connection failed before any byte of a response arrived."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.code)
        self.error = error


# One answer per expired deadline (README, "Timeouts").
_TIMEOUT_ERRORS: dict[str, type[ProxyError]] = {
    "upstream_connect": UpstreamConnectTimeout,
    "upstream_send": UpstreamSendTimeout,
    "upstream_read": UpstreamTimeout,
    "pool_wait": UpstreamBusy,
    "request_deadline": RequestDeadlineExceeded,
}


class UpstreamClient:
    """Forwards requests to MobilePay over a keep-alive pool, mapping every failure."""

    def __init__(
        self, mobilepay: MobilePayConfig, upstream: UpstreamConfig, metrics: Metrics
    ) -> None:
        self._pool = ConnectionPool(
            tls_context(mobilepay),
            limit=upstream.max_connections,
            connect_timeout=upstream.connect_timeout_seconds,
            send_timeout=upstream.send_timeout_seconds,
            read_timeout=upstream.timeout_seconds,
            pool_timeout=upstream.pool_timeout_seconds,
            keepalive_timeout=upstream.keepalive_timeout_seconds,
        )
        self._deadline_seconds = upstream.request_deadline_seconds
        self._timeouts = {phase: metrics.timeouts.labels(phase) for phase in _TIMEOUT_ERRORS}

    def close(self) -> None:
        self._pool.close()

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """One attempt, within ``deadline`` (event loop time; by default one request's worth).

        Raises RetryableFailure when nothing was sent or no response byte arrived, else
        ProxyError.
        """
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._deadline_seconds
        head = serialise_headers(method, url.host_port_subcomponent or "", headers, body)
        try:
            return await self._pool.request(method, url, head, body, deadline)
        except Timeout as exc:
            self._timeouts[exc.phase].inc()
            error = _TIMEOUT_ERRORS[exc.phase]()
            log.warning("upstream %s %s: %s timed out", method, url.path, exc.phase)
            if exc.phase == "upstream_connect":  # nothing was sent
                raise RetryableFailure(error) from None
            raise error from None
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
