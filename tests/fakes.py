"""Real servers on loopback standing in for MobilePay, recording what they received."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-Zq8w"
IBM_CLIENT_ID = "test-ibm-client-id-7Hk2"


@dataclass
class Received:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


def make_jwt(vat: str, lifetime: float, serial: int) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    header = {"alg": "RS256", "typ": "at+jwt", "kid": "test"}
    payload = {
        "iat": now,
        "nbf": now,
        "exp": now + int(lifetime),
        "merchant_vat": vat,
        "client_id": CLIENT_ID,
        "jti": f"jti-{serial}",
    }
    return f"{part(header)}.{part(payload)}.c2lnbmF0dXJl{serial}"


@dataclass
class TokenServer:
    """A token endpoint: checks the client credentials, issues numbered tokens per VAT."""

    # Where it listens, once started (the token_server fixture).
    url: str = ""
    lifetime: float = 3600.0
    expires_in: Any = None
    delay: float = 0.0
    # Called before answering; may return a response to send instead (fault injection).
    fault: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None
    requests: list[Received] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    issued_for: dict[str, list[str]] = field(default_factory=dict)

    def count(self, vat: str | None = None) -> int:
        if vat is None:
            return len(self.requests)
        return sum(1 for r in self.requests if f"merchant_vat={vat}" in r.body.decode())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.method, request.path_qs, request.headers, body))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fault is not None:
            response = await self.fault(request)
            if response is not None:
                return response
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if (
            request.headers.get("Authorization") != f"Basic {expected}"
            or request.headers.get("x-ibm-client-id") != IBM_CLIENT_ID
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        vat = str(form.get("merchant_vat", ""))
        token = make_jwt(vat, self.lifetime, len(self.issued) + 1)
        self.issued.append(token)
        self.issued_for.setdefault(vat, []).append(token)
        expires_in = self.lifetime + 100 if self.expires_in is None else self.expires_in
        return web.json_response(
            {
                "access_token": token,
                "expires_in": expires_in,
                "token_type": "Bearer",
                "scope": "integrator_scope",
            }
        )


@dataclass
class PosServer:
    """A PoS V10 upstream that records each request and answers per a pluggable handler."""

    tokens: TokenServer
    # Where it listens, once started (the pos_server fixture).
    url: str = ""
    requests: list[Received] = field(default_factory=list)
    handler: Callable[[web.Request, bytes], Awaitable[web.StreamResponse]] | None = None
    # Tokens this upstream refuses with 401 (as MobilePay would a revoked one).
    rejected: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.method, request.raw_path, request.headers, body))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        vat = request.headers.get("X-MobilePay-Merchant-VAT-Number", "")
        if token in self.rejected or token not in self.tokens.issued_for.get(vat, []):
            return web.Response(status=401)
        if self.handler is not None:
            return await self.handler(request, body)
        return web.json_response(
            {
                "path": request.raw_path,
                "method": request.method,
                "vat": vat,
                "body": body.decode(errors="replace"),
                "pollDelayInMs": 1000,
            },
            headers={"X-Upstream": "pos"},
        )


async def start_tls_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], context: ssl.SSLContext
) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def held_until(
    release: asyncio.Event,
) -> Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]:
    """A :class:`PosServer` handler that answers ``{"ok": true}`` once ``release`` is set."""

    async def held(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"ok": True})

    return held
