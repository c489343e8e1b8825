"""Token life cycle per merchant: single-flight fetches, refresh ahead, backoff, forced refresh.

- Concurrent requests for a merchant without a usable token share one fetch.
- A token past its refresh point keeps serving while one background fetch replaces it.
- After a failed fetch, the merchant backs off (exponential, jittered, capped); meanwhile a
  still-valid token keeps serving and a request without one is refused with a retry hint.
- A token MobilePay rejected is replaced once, however many requests saw it rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config import TokenConfig
from proxy.errors import TokenUnavailable
from proxy.metrics import Metrics
from proxy.tokens.fetcher import TokenFetcher, TokenFetchError
from proxy.tokens.store import SharedToken, StoreUnavailable, TokenStore
from proxy.tokens.token import Token, fingerprint

if TYPE_CHECKING:
    # Only imported when configured: it needs the optional redis and cryptography packages.
    from proxy.tokens.shared import RedisTokenStore

log = logging.getLogger(__name__)
# While another copy of the proxy fetches a merchant's token, how often to look for it.
SHARED_POLL_SECONDS = 0.05


@dataclass(slots=True)
class _MerchantState:
    generation: int = 0
    inflight: asyncio.Task[Token] | None = None
    failures: int = 0
    retry_at: float = 0.0
    reported_rejected: int = 0


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """What may be said about a merchant's token: never its value."""

    vat: str
    valid: bool
    expires_in_seconds: float | None
    fingerprint: str | None


class TokenManager:
    def __init__(
        self,
        fetcher: TokenFetcher,
        store: TokenStore,
        config: TokenConfig,
        metrics: Metrics,
        *,
        shared: RedisTokenStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = shared
        self._fetcher = fetcher
        self._store = store
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._states: dict[str, _MerchantState] = {}
        self._background: set[asyncio.Task[Token]] = set()
        # Since when every token fetch has failed (None while the last one succeeded).
        self._failing_since: float | None = None

    def reconfigure(self, fetcher: TokenFetcher, config: TokenConfig) -> None:
        """Use new credentials or timings for fetches from now on."""
        self._fetcher = fetcher
        self._config = config

    def usable(self, vat: str) -> Token | None:
        """The held token if it can be used now (a refresh starts when due), else None."""
        token = self._store.get(vat)
        if token is not None:
            now = self._clock()
            if now < token.expires_at:
                if now >= token.refresh_at:
                    self._refresh_in_background(vat)
                return token
        return None

    async def get(self, vat: str) -> Token:
        """A usable token for the merchant, fetching one only when none is held."""
        token = self.usable(vat)
        if token is not None:
            return token
        held = self._store.get(vat) is not None
        return await self._shared_fetch(vat, "expiring" if held else "initial")

    async def replace_rejected(self, rejected: Token) -> Token:
        """A token to replay with after MobilePay answered 401 to ``rejected``.

        Only the first caller for a rejected generation fetches; the others get its result.
        With a shared store, that holds across every copy of the proxy.
        """
        vat = rejected.vat
        state = self._state(vat)
        if (
            self._shared is not None
            and rejected.generation > state.reported_rejected
            and self._shared.available()
        ):
            # Once per rejected generation, however many requests saw it refused.
            state.reported_rejected = rejected.generation
            await self._shared.report_rejected(vat, rejected.generation)
        current = self._store.get(vat)
        if (
            current is not None
            and current.generation != rejected.generation
            and self._clock() < current.expires_at
        ):
            return current
        if state.inflight is not None:
            return await asyncio.shield(state.inflight)
        # New requests must not pick up a token MobilePay has just refused.
        self._store.discard(vat, rejected.generation)
        return await self._shared_fetch(vat, "forced", rejected.generation)

    def on_shared_event(self, kind: str, vat: str, generation: int) -> None:
        """Another copy stored a newer token, or saw MobilePay refuse one: drop ours."""
        token = self._store.get(vat)
        if token is None:
            return
        if (kind == "new" and token.generation < generation) or (
            kind == "rejected" and token.generation <= generation
        ):
            self._store.discard(vat, token.generation)

    def forget(self, vat: str) -> None:
        """Drop everything held for a merchant (it left the routing map)."""
        self._store.discard(vat)
        state = self._states.pop(vat, None)
        if state is not None and state.inflight is not None:
            state.inflight.cancel()

    def forget_all(self) -> None:
        for vat in {token.vat for token in self._store} | set(self._states):
            self.forget(vat)

    def failing_for(self) -> float | None:
        """Seconds since which every token fetch has failed; None while the last succeeded."""
        if self._failing_since is None:
            return None
        return self._clock() - self._failing_since

    def status(self, vats: Iterable[str]) -> list[TokenStatus]:
        """Token validity and remaining life per merchant VAT, for readiness and metrics."""
        now = self._clock()
        result = []
        for vat in vats:
            token = self._store.get(vat)
            if token is None or now >= token.expires_at:
                result.append(TokenStatus(vat, False, None, None))
            else:
                result.append(TokenStatus(vat, True, token.expires_at - now, token.fingerprint))
        return result

    def held(self) -> list[TokenStatus]:
        """The status of every token currently held."""
        return self.status(token.vat for token in self._store)

    async def close(self) -> None:
        tasks = [state.inflight for state in self._states.values() if state.inflight]
        tasks.extend(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _state(self, vat: str) -> _MerchantState:
        state = self._states.get(vat)
        if state is None:
            state = self._states[vat] = _MerchantState()
        return state

    def _refresh_in_background(self, vat: str) -> None:
        state = self._state(vat)
        if state.inflight is not None or self._clock() < state.retry_at:
            return
        task = self._start(vat, state, "expiring")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shared_fetch(self, vat: str, reason: str, rejected: int | None = None) -> Token:
        state = self._state(vat)
        if state.inflight is None:
            wait = state.retry_at - self._clock()
            if wait > 0:
                raise TokenUnavailable(
                    "MobilePay's token service is failing; the proxy is backing off.",
                    retry_after=max(1, math.ceil(wait)),
                )
            self._start(vat, state, reason, rejected)
        assert state.inflight is not None
        # Shielded: a terminal that hangs up must not cancel the fetch others wait for.
        return await asyncio.shield(state.inflight)

    def _start(
        self, vat: str, state: _MerchantState, reason: str, rejected: int | None = None
    ) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._obtain(vat, state, reason, rejected))
        state.inflight = task
        task.add_done_callback(_retrieve_exception)
        return task

    async def _obtain(
        self, vat: str, state: _MerchantState, reason: str, rejected: int | None
    ) -> Token:
        try:
            token = None
            if self._shared is not None and self._shared.available():
                with contextlib.suppress(StoreUnavailable):
                    token = await self._through_shared_store(
                        self._shared, vat, state, reason, rejected
                    )
            if token is None:
                token = await self._fetch(vat, state, reason, state.generation + 1)
        finally:
            state.inflight = None
        self._store.put(token)
        return token

    async def _through_shared_store(
        self,
        shared: RedisTokenStore,
        vat: str,
        state: _MerchantState,
        reason: str,
        rejected: int | None,
    ) -> Token | None:
        """Adopt another copy's token, or fetch under the cluster-wide lock and share it.

        None when the lock could not be had in time (its holder died or hangs): the
        caller then fetches on its own.
        """
        deadline = self._clock() + shared.lock_seconds + 1.0
        while True:
            found = await shared.load(vat)
            if found is not None and _acceptable(found, reason, rejected):
                return self._adopt(vat, state, found)
            owner = await shared.lock(vat)
            if owner is not None:
                try:
                    found = await shared.load(vat)
                    if found is not None and _acceptable(found, reason, rejected):
                        return self._adopt(vat, state, found)
                    generation = await shared.next_generation(vat)
                    token = await self._fetch(vat, state, reason, generation)
                    await shared.save(
                        vat,
                        SharedToken(
                            token.value,
                            token.generation,
                            refresh_at=_wall(token.refresh_at, self._clock()),
                            expires_at=token.wall_expires_at,
                        ),
                    )
                    return token
                finally:
                    await shared.unlock(vat, owner)
            if self._clock() >= deadline:
                return None
            await asyncio.sleep(SHARED_POLL_SECONDS)

    def _adopt(self, vat: str, state: _MerchantState, found: SharedToken) -> Token:
        now, wall_now = self._clock(), time.time()
        state.generation = max(state.generation, found.generation)
        self._succeeded(state)
        return Token(
            value=found.value,
            vat=vat,
            generation=found.generation,
            obtained_at=now,
            refresh_at=now + found.refresh_at - wall_now,
            expires_at=now + found.expires_at - wall_now,
            wall_expires_at=found.expires_at,
            fingerprint=fingerprint(found.value),
        )

    def _succeeded(self, state: _MerchantState) -> None:
        state.failures = 0
        state.retry_at = 0.0
        self._failing_since = None

    async def _fetch(self, vat: str, state: _MerchantState, reason: str, generation: int) -> Token:
        """One call to MobilePay's token endpoint."""
        started = self._clock()
        try:
            fetched = await self._fetcher.fetch(vat)
        except TokenFetchError as exc:
            self._metrics.token_refreshes.labels(reason, "failure").inc()
            raise self._failed(vat, state, exc) from None
        finally:
            self._metrics.token_fetch_duration.observe(self._clock() - started)
        now = self._clock()
        lifetime = fetched.lifetime
        margin = min(self._config.expiry_margin_seconds, lifetime * 0.1)
        ahead = min(self._config.refresh_ahead_seconds, lifetime * 0.25)
        state.generation = max(state.generation, generation)
        token = Token(
            value=fetched.value,
            vat=vat,
            generation=generation,
            obtained_at=now,
            refresh_at=now + lifetime - margin - ahead,
            expires_at=now + lifetime - margin,
            wall_expires_at=time.time() + lifetime - margin,
            fingerprint=fingerprint(fetched.value),
        )
        self._succeeded(state)
        self._metrics.token_refreshes.labels(reason, "success").inc()
        log.info(
            "token %s for merchant %s (%s), usable for %.0f s",
            token.fingerprint,
            vat,
            reason,
            lifetime - margin,
        )
        return token

    def _failed(self, vat: str, state: _MerchantState, exc: TokenFetchError) -> TokenUnavailable:
        now = self._clock()
        state.failures += 1
        if self._failing_since is None:
            self._failing_since = now
        cap = self._config.backoff_max_seconds
        delay = min(cap, self._config.backoff_initial_seconds * 2 ** (state.failures - 1))
        # Full jitter on the upper half keeps many proxies from retrying in step.
        delay *= random.uniform(0.5, 1.0)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, cap))
        state.retry_at = now + delay
        if exc.credentials:
            log.error(
                "token fetch for merchant %s failed: %s; check client_id, client_secret "
                "and ibm_client_id",
                vat,
                exc.reason,
            )
        else:
            log.warning(
                "token fetch for merchant %s failed (%d in a row): %s; next attempt in %.1f s",
                vat,
                state.failures,
                exc.reason,
                delay,
            )
        return TokenUnavailable(
            "No MobilePay access token could be obtained for this merchant.",
            retry_after=max(1, math.ceil(delay)),
        )


def _acceptable(found: SharedToken, reason: str, rejected: int | None) -> bool:
    """Whether a stored token may be used instead of fetching one."""
    now = time.time()
    if found.expires_at <= now or (rejected is not None and found.generation <= rejected):
        return False
    return reason != "expiring" or found.refresh_at > now


def _wall(monotonic_time: float, monotonic_now: float) -> float:
    return time.time() + monotonic_time - monotonic_now


def _retrieve_exception(task: asyncio.Task[Token]) -> None:
    # The failure reaches every waiter; with none left, it is already logged.
    if not task.cancelled():
        task.exception()
