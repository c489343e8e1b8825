"""Application factories: the proxy's live parts, and the operator-facing metrics app.

The terminal-facing listener is :mod:`proxy.edge`; it calls :func:`proxy_handler`.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.config import Config, ConfigError
from proxy.edge import Handler
from proxy.errors import ProxyError
from proxy.forwarding import Forwarder
from proxy.messages import Reply, Request
from proxy.metrics import Metrics
from proxy.tokens.fetcher import TokenFetcher
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import MemoryTokenStore
from proxy.upstream import UpstreamClient, create_session, tls_context

if TYPE_CHECKING:
    from proxy.tokens.shared import RedisTokenStore


@dataclass(slots=True)
class ProxyState:
    """The proxy's live parts, shared with the metrics app and replaced on reload."""

    config: Config
    metrics: Metrics
    session: aiohttp.ClientSession | None = None
    tokens: TokenManager | None = None
    upstream: UpstreamClient | None = None
    forwarder: Forwarder | None = None
    draining: bool = False


STATE = web.AppKey("state", ProxyState)


def create_app(config: Config, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The proxy's live parts, opened and closed with the app (start it with an AppRunner).

    Its ClientSession, token manager and forwarder live exactly as long as the app.
    """
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics.merchants.set(len(config.routing.merchants))
    app = web.Application()
    app[STATE] = ProxyState(config=config, metrics=metrics)
    app.cleanup_ctx.append(_upstream_resources)
    return app


async def _upstream_resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    async with create_session(config.mobilepay, config.upstream) as session:
        fetcher = TokenFetcher(session, config.mobilepay, config.tokens.timeout_seconds)
        shared = _shared_store(config, state.metrics)
        tokens = TokenManager(
            fetcher, MemoryTokenStore(), config.tokens, state.metrics, shared=shared
        )
        if shared is not None:
            await shared.start(tokens.on_shared_event)
        state.session, state.tokens = session, tokens
        upstream = UpstreamClient(config.mobilepay, config.upstream, state.metrics)
        state.upstream = upstream
        state.forwarder = Forwarder(config, tokens, upstream, state.metrics)
        state.metrics.token_lifetimes = lambda: (
            (status.vat, status.expires_in_seconds or 0.0) for status in tokens.held()
        )
        try:
            yield
        finally:
            await tokens.close()
            upstream.close()
            if shared is not None:
                await shared.close()


def validate(config: Config) -> None:
    """Refuse, as ConfigError, what start-up would refuse beyond the file itself.

    Every command checks this after loading the file, ``check-config`` included, so a file
    it accepts starts. Listening addresses are resolved, as listening would; nothing here
    connects anywhere or listens: an unreachable Redis is not a
    configuration error (the proxy runs without it, see proxy.tokens.shared), and a port in
    use is a property of the machine, reported when the proxy starts.
    """
    server = config.server
    for key, host in (("host", server.host), ("metrics_host", server.metrics_host)):
        # What listening resolves first; a name that does not resolve can never be listened on.
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(
                f"[server] {key}: cannot listen on {host!r}: {exc.strerror or exc}"
            ) from None
    mobilepay = config.mobilepay
    try:
        tls_context(mobilepay)
    except ssl.SSLError:
        raise ConfigError(
            f"[mobilepay] ca_file: {mobilepay.ca_file} holds no PEM CA certificate"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"[mobilepay] ca_file: cannot read {mobilepay.ca_file}: {exc.strerror or exc}"
        ) from None
    store = config.tokens.store
    if store is not None:
        # Loaded only for a shared store, as in _shared_store: redis-py and cryptography
        # cost a process about 15 MB of memory.
        from redis import asyncio as aioredis
        from redis.exceptions import RedisError

        # The client's own URL parser, and a connection object built (not connected) from
        # it: unknown or malformed query options fail here, not at the first token.
        try:
            pool = aioredis.BlockingConnectionPool.from_url(store.url)
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, RedisError) as exc:
            raise ConfigError(f"[tokens] store: {exc}") from None
        except TypeError:
            raise ConfigError(
                "[tokens] store: the URL's query names an option the Redis client does not know"
            ) from None


def _shared_store(config: Config, metrics: Metrics) -> RedisTokenStore | None:
    if config.tokens.store is None:
        return None
    # Here, not at the top: without a shared store neither redis-py nor cryptography loads.
    from proxy.tokens.shared import RedisTokenStore

    return RedisTokenStore(
        config.tokens.store, config.mobilepay.client_id, config.mobilepay.client_secret, metrics
    )


# Settings bound to the listening sockets or the upstream session; a reload cannot change them.
_RESTART_ONLY = ("server", "upstream", "mobilepay.ca_file", "tokens.store", "logging")


def apply_config(state: ProxyState, new: Config) -> list[str]:
    """Switch to a reloaded configuration; return the changed settings that need a restart.

    Requests already in flight keep the forwarder (and so the merchant map) they started
    with; new requests get the new one. Merchants that left the map lose their tokens;
    new credentials drop every token and re-key the shared store. A request waiting for a
    token fetch that a reload abandons still gets an answer (see TokenManager).
    """
    old, tokens, session = state.config, state.tokens, state.session
    if tokens is None or session is None:
        raise RuntimeError("configuration can only be reloaded while the app runs")
    ignored = [name for name in _RESTART_ONLY if _setting(old, name) != _setting(new, name)]
    new = replace(
        new,
        server=old.server,
        upstream=old.upstream,
        mobilepay=replace(new.mobilepay, ca_file=old.mobilepay.ca_file),
        tokens=replace(new.tokens, store=old.tokens.store),
        logging=old.logging,
    )
    if (new.mobilepay, new.tokens) != (old.mobilepay, old.tokens):
        fetcher = TokenFetcher(session, new.mobilepay, new.tokens.timeout_seconds)
        tokens.reconfigure(fetcher, new.tokens)
    if _credentials(new) != _credentials(old):
        tokens.rotate_credentials(new.mobilepay.client_id, new.mobilepay.client_secret)
    else:
        kept = {merchant.vat for merchant in new.routing.merchants.values()}
        for merchant in old.routing.merchants.values():
            if merchant.vat not in kept:
                tokens.forget(merchant.vat)
    assert state.upstream is not None
    state.forwarder = Forwarder(new, tokens, state.upstream, state.metrics)
    state.config = new
    state.metrics.merchants.set(len(new.routing.merchants))
    return ignored


def _setting(config: Config, name: str) -> object:
    value: object = config
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _credentials(config: Config) -> tuple[str, ...]:
    mobilepay = config.mobilepay
    return (
        mobilepay.client_id,
        mobilepay.client_secret,
        mobilepay.ibm_client_id,
        str(mobilepay.token_url),
    )


def proxy_handler(app: web.Application) -> Handler:
    """The terminal request handler for :class:`proxy.edge.EdgeServer`.

    Each request uses the forwarder in force when it arrives, so a reload takes effect for
    the next request.
    """
    return _CurrentForwarder(app[STATE])


class _CurrentForwarder:
    def __init__(self, state: ProxyState) -> None:
        self._state = state

    def _forwarder(self) -> Forwarder:
        forwarder = self._state.forwarder
        assert forwarder is not None, "requests arrive only after start-up"
        return forwarder

    def handle(self, request: Request) -> Awaitable[Reply]:
        # The forwarder's own coroutine, not one wrapped around it: a frame less per request.
        return self._forwarder().handle(request)

    def refuse(self, error: ProxyError, remote: str | None, method: str | None) -> Reply:
        return self._forwarder().refuse(error, remote, method)


def create_metrics_app(state: ProxyState) -> web.Application:
    """``/metrics``, ``/healthz`` and ``/readyz`` for operators, on their own port."""
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready unless draining, not started, or the token service has failed for too long."""
    state = request.app[STATE]
    tokens = state.tokens
    vats = sorted({merchant.vat for merchant in state.config.routing.merchants.values()})
    failing_for = tokens.failing_for() if tokens is not None else None
    token_service_down = (
        failing_for is not None and failing_for > state.config.tokens.unready_after_seconds
    )
    ready = tokens is not None and not state.draining and not token_service_down
    body = {
        "status": "ready" if ready else "not_ready",
        "draining": state.draining,
        "started": tokens is not None,
        "merchants": len(state.config.routing.merchants),
        "token_service": {
            "failing_for_seconds": None if failing_for is None else round(failing_for, 1),
            "unready_after_seconds": state.config.tokens.unready_after_seconds,
        },
        "tokens": [
            {
                "merchant_vat": status.vat,
                "valid": status.valid,
                "expires_in_seconds": (
                    None if status.expires_in_seconds is None else round(status.expires_in_seconds)
                ),
                "fingerprint": status.fingerprint,
            }
            for status in (tokens.status(vats) if tokens is not None else ())
        ],
    }
    return web.Response(
        status=200 if ready else 503, body=json.dumps(body), content_type="application/json"
    )
