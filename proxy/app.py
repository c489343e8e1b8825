"""Application factories: the terminal-facing proxy app and the operator-facing metrics app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.config import Config
from proxy.errors import InvalidPath, MethodNotAllowed, ProxyError
from proxy.forwarding import ALLOWED_HEADER, ALLOWED_METHODS, Forwarder
from proxy.metrics import Metrics
from proxy.tokens.fetcher import TokenFetcher
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import MemoryTokenStore
from proxy.upstream import UpstreamClient, create_session


@dataclass(slots=True)
class ProxyState:
    """What the metrics app needs to know about the proxy app."""

    config: Config
    metrics: Metrics
    tokens: TokenManager | None = None
    draining: bool = False


STATE = web.AppKey("state", ProxyState)
FORWARDER = web.AppKey("forwarder", Forwarder)


def create_app(config: Config, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The terminal-facing proxy. Its ClientSession lives exactly as long as the app."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    metrics.merchants.set(len(config.routing.merchants))
    server = config.server
    app = web.Application(
        handler_args={
            "max_line_size": server.max_line_size,
            "max_field_size": server.max_field_size,
            "max_headers": server.max_headers,
            "keepalive_timeout": server.keepalive_timeout_seconds,
            # How long an unread body is drained after an error answer before closing.
            "lingering_time": 1.0,
        }
    )
    app[STATE] = ProxyState(config=config, metrics=metrics)
    app.middlewares.append(_json_errors)
    app.cleanup_ctx.append(_upstream_resources)
    app.router.add_route("*", "/{path:.*}", _handle)
    return app


async def _upstream_resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    async with create_session(config.mobilepay, config.upstream) as session:
        fetcher = TokenFetcher(session, config.mobilepay, config.tokens.timeout_seconds)
        tokens = TokenManager(fetcher, MemoryTokenStore(), config.tokens, state.metrics)
        state.tokens = tokens
        app[FORWARDER] = Forwarder(config, tokens, UpstreamClient(session), state.metrics)
        try:
            yield
        finally:
            await tokens.close()


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests the router itself turns away (``CONNECT host:port``, ``OPTIONS *``) get JSON too."""
    try:
        return await handler(request)
    except web.HTTPException:
        error: ProxyError = (
            MethodNotAllowed(
                f"The method is not allowed; use one of {ALLOWED_HEADER}.", allowed=ALLOWED_HEADER
            )
            if request.method not in ALLOWED_METHODS
            else InvalidPath("The request target must be an absolute path.")
        )
        return error.to_response()


async def _handle(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


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
    state = request.app[STATE]
    checks = {
        "config_loaded": True,
        "merchants": len(state.config.routing.merchants),
        "draining": state.draining,
        "upstream_ready": state.tokens is not None,
    }
    ready = state.tokens is not None and not state.draining
    return web.Response(
        status=200 if ready else 503,
        body=json.dumps({"status": "ready" if ready else "not_ready", **checks}),
        content_type="application/json",
    )
