"""The request pipeline: route, then token, then forward, then relay the response."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from proxy.config import Config, Merchant
from proxy.errors import (
    MethodNotAllowed,
    ProxyError,
    RequestDeadlineExceeded,
    UnsupportedUpgrade,
)
from proxy.headers import relayed_head, request_strip_set, upstream_request_headers
from proxy.http1 import Response as UpstreamResponse
from proxy.logs import AccessEntry, AccessLog
from proxy.messages import Reply, Request, error_reply
from proxy.metrics import Metrics, method_label
from proxy.request_ids import REQUEST_ID_HEADER, RequestIds, mobilepay_correlation_id
from proxy.routing import (
    ALLOWED_HEADER,
    ALLOWED_METHODS,
    POS_V10_ROUTES,
    UNMATCHED,
    Route,
    RouteTable,
    check_prefix,
    check_source,
    parse_target,
    resolve_merchant,
)
from proxy.tokens.manager import TokenManager
from proxy.tokens.token import Token
from proxy.upstream import RetryableFailure, UpstreamClient

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "X-MobilePay-Idempotency-Key"
# Accepted targets remembered with their upstream URL and route. Only targets of requests
# that named a known merchant are remembered, and the memory is bounded by bytes: nothing
# an unauthenticated terminal sends may grow the proxy's state.
TARGET_CACHE_SIZE = 4096
TARGET_CACHE_BYTES = 4 * 1024 * 1024
TARGET_CACHE_MAX_TARGET = 1024


@dataclass(slots=True)
class _Outcome:
    """What the access log says about a request."""

    request_id: str
    method: str  # the method's metric label
    route: Route = UNMATCHED
    merchant: str | None = None
    token: str | None = None
    attempts: int = 0
    mobilepay_correlation_id: str | None = None
    deadline: float = 0.0  # event loop time by which the answer is due


class Forwarder:
    """Handles every terminal request for one loaded configuration."""

    def __init__(
        self,
        config: Config,
        tokens: TokenManager,
        upstream: UpstreamClient,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._upstream = upstream
        self._metrics = metrics
        self._routes = RouteTable(POS_V10_ROUTES)
        self._strip = request_strip_set(config.routing.header)
        self._base = str(config.mobilepay.api_base_url).rstrip("/")
        self._ibm_client_id = config.mobilepay.ibm_client_id
        self._targets: dict[str, tuple[URL, Route]] = {}
        self._targets_bytes = 0
        self._max_body = config.server.max_body_bytes
        self._body_timeout = config.server.body_timeout_seconds
        self._deadline_seconds = config.upstream.request_deadline_seconds
        self._deadline_expired = metrics.timeouts.labels("request_deadline")
        self._access = AccessLog(metrics.log_lines_dropped.inc)
        self._request_ids = RequestIds()

    async def handle(self, request: Request) -> Reply:
        started = time.perf_counter()
        outcome = _Outcome(
            self._request_ids.of(request.headers),
            method_label(request.method),
            deadline=asyncio.get_running_loop().time() + self._deadline_seconds,
        )
        metrics = self._metrics
        metrics.requests_in_flight += 1
        try:
            reply = await self._proxy(request, outcome)
        except ProxyError as exc:
            self._metrics.errors.labels(exc.code).inc()
            reply = error_reply(exc, outcome.request_id)
        finally:
            metrics.requests_in_flight -= 1
        elapsed = time.perf_counter() - started
        method = outcome.method
        route = outcome.route.template
        self._metrics.observe_request(method, route, reply.status, elapsed)
        if self._access.enabled():
            self._access.write(
                AccessEntry(
                    time.time(),
                    request.remote,
                    method,
                    route,
                    request.target.partition("?")[0] if outcome.route is not UNMATCHED else None,
                    reply.status,
                    elapsed * 1000,
                    outcome.merchant,
                    outcome.token,
                    outcome.attempts,
                    outcome.request_id,
                    outcome.mobilepay_correlation_id,
                )
            )
        return reply

    def refuse(self, error: ProxyError, remote: str | None, method: str | None) -> Reply:
        """Record and answer a request the edge refused before it could be handled.

        Counted and logged like every other answer, under route ``unmatched``; nothing of
        the refused bytes is logged.
        """
        label = method_label(method or "")
        request_id = self._request_ids.new()
        self._metrics.errors.labels(error.code).inc()
        self._metrics.requests.labels(label, UNMATCHED.template, error.status).inc()
        if self._access.enabled():
            self._access.write(
                AccessEntry(
                    time.time(),
                    remote,
                    label,
                    UNMATCHED.template,
                    None,
                    error.status,
                    0.0,
                    None,
                    None,
                    0,
                    request_id,
                    None,
                )
            )
        return error_reply(error, request_id)

    async def _proxy(self, request: Request, outcome: _Outcome) -> Reply:
        if request.method not in ALLOWED_METHODS and not request.target.startswith("/"):
            # CONNECT's authority-form, OPTIONS' asterisk-form: it is the method that is wrong.
            raise MethodNotAllowed(allowed=ALLOWED_HEADER)
        url, outcome.route, known = self._resolve_target(request.target)
        if request.method not in outcome.route.methods:
            raise MethodNotAllowed(allowed=outcome.route.allow)
        if "Upgrade" in request.headers:
            raise UnsupportedUpgrade()
        merchant = resolve_merchant(
            request.headers, self._config.routing.header, self._config.routing.merchants
        )
        outcome.merchant = merchant.key
        check_source(merchant, request.remote)
        if not known:
            self._remember_target(request.target, url, outcome.route)
        body = (
            await request.read_body(self._max_body, self._body_timeout)
            if request.body is not None
            else b""  # most requests: no coroutine to read nothing
        )

        # A held token needs no wait, and so no timer (a timer per request costs throughput).
        token = self._tokens.usable(merchant.vat) or await self._within_deadline(
            self._tokens.get(merchant.vat), outcome
        )
        outcome.token = token.fingerprint
        upstream = await self._attempt(request, outcome, merchant, token, url, body)
        if upstream.status != 401:
            self._tokens.accepted(token)
        elif self._tokens.unauthorized_cooldown(merchant.vat):
            # A fresh token was refused too, moments ago: another fetch would not help and
            # costs the one credential every merchant shares.
            self._metrics.upstream_401_retries.labels("cooldown").inc()
        else:
            upstream = await self._replay_after_401(request, outcome, merchant, token, url, body)
        if upstream.status >= 400:
            outcome.mobilepay_correlation_id = mobilepay_correlation_id(
                upstream.status, upstream.headers, upstream.body
            )
        return Reply(
            upstream.status,
            upstream.reason,
            CIMultiDict({REQUEST_ID_HEADER: outcome.request_id}),
            upstream.body,
            relayed=relayed_head(upstream.fields, upstream.names),
        )

    async def _replay_after_401(
        self,
        request: Request,
        outcome: _Outcome,
        merchant: Merchant,
        rejected: Token,
        url: URL,
        body: bytes,
    ) -> UpstreamResponse:
        try:
            token = await self._within_deadline(self._tokens.replace_rejected(rejected), outcome)
        except ProxyError:
            self._metrics.upstream_401_retries.labels("error").inc()
            raise
        outcome.token = token.fingerprint
        upstream = await self._attempt(request, outcome, merchant, token, url, body)
        result = "unauthorized" if upstream.status == 401 else "success"
        self._metrics.upstream_401_retries.labels(result).inc()
        if upstream.status == 401:
            self._tokens.start_unauthorized_cooldown(token)
        else:
            self._tokens.accepted(token)
        return upstream

    async def _attempt(
        self,
        request: Request,
        outcome: _Outcome,
        merchant: Merchant,
        token: Token,
        url: URL,
        body: bytes,
    ) -> UpstreamResponse:
        """Send once; resend once after a connection failure if that cannot double-charge."""
        headers = upstream_request_headers(
            request.headers,
            self._strip,
            token=token.value,
            ibm_client_id=self._ibm_client_id,
            vat=merchant.vat,
            peer=request.remote,
        )
        headers[REQUEST_ID_HEADER] = outcome.request_id
        method = request.method
        for attempt in (1, 2):
            outcome.attempts += 1
            started = time.perf_counter()
            try:
                return await self._upstream.send(method, url, headers, body, outcome.deadline)
            except RetryableFailure as failure:
                # Decided on what was sent: a key the hygiene dropped is no key.
                if attempt == 2 or not _safe_to_resend(method, headers):
                    raise failure.error from None
                self._metrics.upstream_retries.labels(method).inc()
            finally:
                self._metrics.observe_upstream(
                    outcome.method, outcome.route.template, time.perf_counter() - started
                )
        raise AssertionError("unreachable")

    async def _within_deadline(self, wait: Awaitable[Token], outcome: _Outcome) -> Token:
        """A token wait cut short at the request's deadline (the fetch itself goes on)."""
        scope = asyncio.timeout_at(outcome.deadline)
        try:
            async with scope:
                return await wait
        except TimeoutError:
            if not scope.expired():
                raise
            self._deadline_expired.inc()
            raise RequestDeadlineExceeded() from None

    def _resolve_target(self, raw_target: str) -> tuple[URL, Route, bool]:
        """The upstream URL and route for an allowed target, and whether it was remembered;
        raises for the rest.

        Terminals poll the same few targets over and over, so accepted ones are remembered
        once the request names a known merchant (see :meth:`_remember_target`).
        """
        resolved = self._targets.get(raw_target)
        if resolved is not None:
            return resolved[0], resolved[1], True
        target = parse_target(raw_target)
        check_prefix(target.path, self._config.routing.allowed_prefixes)
        raw = self._base + target.path
        if target.query:
            raw += "?" + target.query
        return URL(raw, encoded=True), self._routes.match(target.path), False

    def _remember_target(self, raw_target: str, url: URL, route: Route) -> None:
        """Remember a resolved target; the cache starts afresh when full (entries or bytes)."""
        if len(raw_target) > TARGET_CACHE_MAX_TARGET:
            return
        # The target and the URL string, which are most of an entry's size.
        size = 2 * len(raw_target) + len(self._base)
        if len(self._targets) >= TARGET_CACHE_SIZE or self._targets_bytes + size > (
            TARGET_CACHE_BYTES
        ):
            self._targets.clear()
            self._targets_bytes = 0
        self._targets[raw_target] = (url, route)
        self._targets_bytes += size


def _safe_to_resend(method: str, sent: CIMultiDict[str]) -> bool:
    """GET, or a POST whose idempotency key makes MobilePay answer a replay with the original.

    ``sent`` are the headers as sent upstream, after hygiene.
    """
    if method == "GET":
        return True
    return method == "POST" and bool(sent.get(IDEMPOTENCY_HEADER, "").strip())
