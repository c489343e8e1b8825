"""Token life cycle per merchant: single-flight fetches, refresh ahead, backoff, forced refresh.

- Concurrent requests for a merchant without a usable token share one fetch.
- A token past its refresh point keeps serving while one background fetch replaces it.
- After a failed fetch, the merchant backs off (exponential, jittered, capped); meanwhile a
  still-valid token keeps serving and a request without one is refused with a retry hint.
- A token MobilePay rejected is replaced once, however many requests saw it rejected; when
  the replacement is rejected too, no new one is fetched for a cool-down.
- A request waiting for a fetch that is abandoned under it (a reload, a shutdown) gets an
  answer: with new credentials it waits once for a fetch with them, otherwise it is refused
  with a retry hint.
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
# The backoff stops doubling here: far beyond any cap, and 2 ** n stays a small float.
MAX_DOUBLINGS = 40
# Why a merchant's fetch was abandoned while requests waited for it.
CREDENTIALS_CHANGED = "credentials"
MERCHANT_REMOVED = "removed"
SHUTTING_DOWN = "closing"


@dataclass(slots=True)
class _MerchantState:
    generation: int = 0
    inflight: asyncio.Task[Token] | None = None
    failures: int = 0
    retry_at: float = 0.0
    reported_rejected: int = 0
    # The newest generation MobilePay refused, here or at another copy: never adopted again.
    rejected: int = 0
    # The newest generation MobilePay answered with anything but 401.
    accepted: int = 0
    # Until then MobilePay's 401s are relayed without fetching (a fresh token was refused).
    unauthorized_until: float = 0.0
    abandoned: str | None = None


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
        self._closed = False
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
        state.rejected = max(state.rejected, rejected.generation)
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
            return await self._wait(vat, state, state.inflight)
        # New requests must not pick up a token MobilePay has just refused.
        self._store.discard(vat, rejected.generation)
        return await self._shared_fetch(vat, "forced", rejected.generation)

    def on_shared_event(self, kind: str, vat: str, generation: int) -> None:
        """Another copy stored a newer token, or saw MobilePay refuse one: drop ours."""
        state = self._states.get(vat)
        if kind == "rejected" and state is not None:
            state.rejected = max(state.rejected, generation)
        token = self._store.get(vat)
        if token is None:
            return
        if (kind == "new" and token.generation < generation) or (
            kind == "rejected" and token.generation <= generation
        ):
            self._store.discard(vat, token.generation)

    def forget(self, vat: str) -> None:
        """Drop everything held for a merchant (it left the routing map).

        Requests waiting for its token get 503 ``token_unavailable``.
        """
        self._drop(vat, MERCHANT_REMOVED)

    def forget_all(self) -> None:
        """Drop every token and fetch (the credentials changed).

        Requests waiting for a fetch wait once more, for one made with the new credentials.
        """
        for vat in {token.vat for token in self._store} | set(self._states):
            self._drop(vat, CREDENTIALS_CHANGED)

    def rotate_credentials(self, client_id: str, client_secret: str) -> None:
        """New credentials: the shared store is re-keyed, every token and fetch dropped."""
        if self._shared is not None:
            self._shared.rekey(client_id, client_secret)
        self.forget_all()

    def unauthorized_cooldown(self, vat: str) -> bool:
        """Whether MobilePay refused a fresh token for this merchant moments ago."""
        state = self._states.get(vat)
        return state is not None and self._clock() < state.unauthorized_until

    def accepted(self, token: Token) -> None:
        """MobilePay answered a request made with ``token`` with something other than 401.

        A token MobilePay has accepted is not one it refuses: a cool-down it started ends.
        """
        state = self._states.get(token.vat)
        if state is not None and token.generation > state.accepted:
            state.accepted = token.generation
            state.unauthorized_until = 0.0

    def start_unauthorized_cooldown(self, token: Token) -> None:
        """MobilePay refused ``token``, itself a replacement for a refused one.

        Unless MobilePay has accepted that token before (a passing refusal), fetching again
        would not help and costs the credential every merchant shares: for
        ``unauthorized_cooldown_seconds`` MobilePay's 401s are relayed without a new fetch.
        """
        seconds = self._config.unauthorized_cooldown_seconds
        state = self._state(token.vat)
        now = self._clock()
        if state.accepted >= token.generation:
            return
        if seconds <= 0:
            log.warning(
                "MobilePay refused a fresh token %s for merchant %s too; relaying its 401",
                token.fingerprint,
                token.vat,
            )
            return
        if now < state.unauthorized_until:
            return
        state.unauthorized_until = now + seconds
        log.warning(
            "MobilePay refused a fresh token %s for merchant %s too; relaying its 401s "
            "without fetching another token for %.0f s (cool-down)",
            token.fingerprint,
            token.vat,
            seconds,
        )

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
        """Cancel every fetch; requests waiting for one get 503 ``token_unavailable``."""
        self._closed = True
        tasks = []
        for state in self._states.values():
            if state.inflight is not None:
                state.abandoned = SHUTTING_DOWN
                tasks.append(state.inflight)
        tasks.extend(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, vat: str, why: str) -> None:
        self._store.discard(vat)
        state = self._states.pop(vat, None)
        if state is not None and state.inflight is not None:
            state.abandoned = why
            state.inflight.cancel()

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

    async def _shared_fetch(
        self, vat: str, reason: str, rejected: int | None = None, *, again: bool = True
    ) -> Token:
        if self._closed:
            raise TokenUnavailable("The proxy is shutting down.", retry_after=1)
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
        return await self._wait(vat, state, state.inflight, again=again)

    async def _wait(
        self,
        vat: str,
        state: _MerchantState,
        task: asyncio.Task[Token],
        *,
        again: bool = True,
    ) -> Token:
        """The fetch's token; an answer even when the fetch is cancelled under the caller."""
        try:
            # Shielded: a terminal that hangs up must not cancel the fetch others wait for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # this request itself is being cancelled
        if state.abandoned == CREDENTIALS_CHANGED and again:
            # The merchant is still served, with new credentials: wait for their token once.
            return await self._shared_fetch(vat, "initial", again=False)
        if state.abandoned == MERCHANT_REMOVED:
            message = "The merchant was removed from the proxy's configuration."
        elif state.abandoned == SHUTTING_DOWN:
            message = "The proxy is shutting down."
        else:
            message = "The proxy's configuration changed while fetching a token; try again."
        log.warning(
            "a token fetch for merchant %s was abandoned (%s); answering 503",
            vat,
            state.abandoned or "cancelled",
        )
        raise TokenUnavailable(message, retry_after=1)

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
            # Never a generation MobilePay refused, however it got back into the store.
            refused = max(rejected or 0, state.rejected)
            found = await shared.load(vat)
            if found is not None and _acceptable(found, reason, refused):
                return self._adopt(vat, state, found)
            owner = await shared.lock(vat)
            if owner is not None:
                try:
                    found = await shared.load(vat)
                    if found is not None and _acceptable(found, reason, refused):
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
        # The issuer's clock starts the token's life no earlier than this request: a slow
        # answer must not pass for extra life.
        started, wall_started = self._clock(), time.time()
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
            refresh_at=started + lifetime - margin - ahead,
            expires_at=started + lifetime - margin,
            wall_expires_at=wall_started + lifetime - margin,
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
        doublings = min(state.failures - 1, MAX_DOUBLINGS)
        delay = min(cap, self._config.backoff_initial_seconds * 2**doublings)
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


def _acceptable(found: SharedToken, reason: str, refused: int) -> bool:
    """Whether a stored token may be used instead of fetching one."""
    now = time.time()
    if found.expires_at <= now or found.generation <= refused:
        return False
    return reason != "expiring" or found.refresh_at > now


def _wall(monotonic_time: float, monotonic_now: float) -> float:
    return time.time() + monotonic_time - monotonic_now


def _retrieve_exception(task: asyncio.Task[Token]) -> None:
    # The failure reaches every waiter; with none left, it is already logged.
    if not task.cancelled():
        task.exception()
