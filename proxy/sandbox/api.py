"""The simulator as an aiohttp application.

Four parts, each its own sub-application under its own prefix:

- ``/integrator-authentication``: the token service (client credentials, RS256 JWTs);
- ``/pos/v10``: the PoS V10 API behind bearer tokens;
- ``/pos/app/usersimulation``: the customer's phone, without a token;
- ``/_sandbox``: knobs and counters for tests and demos, no MobilePay counterpart.

Exceptions from :mod:`.errors` become responses in one middleware.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy

from .control import Faults, RequestLog, SeenRequest, Stats
from .errors import (
    ApiError,
    BadRequest,
    InternalError,
    NotFound,
    OAuthError,
    Unauthorized,
    UnsupportedMediaType,
)
from .jwt import JwtError, TokenSigner
from .settings import SandboxSettings
from .state import VAT_PATTERN, Json, PosState, fingerprint, parse_idempotency_key, parse_uuid

logger = logging.getLogger(__name__)

IBM_CLIENT_ID = "X-IBM-Client-Id"
MERCHANT_VAT_HEADER = "X-MobilePay-Merchant-VAT-Number"
CLIENT_SYSTEM_VERSION = "X-MobilePay-Client-System-Version"
IDEMPOTENCY_KEY = "X-MobilePay-Idempotency-Key"
SCOPE = "integrator_scope"
# The token service announces 100 s more than the token lives; clients that
# trust expires_in alone find out at the edge.
EXPIRES_IN_SLACK_SECONDS = 100
ADMIN_PREFIX = "/_sandbox"
POS_PREFIX = "/pos/v10"
_VERSION_PATTERN = re.compile(r"\d+\.\d+\.\d+")
_JSON_CONTENT_TYPES = frozenset({"application/json", "text/json", "application/json-patch+json"})
_NO_STORE = {hdrs.CACHE_CONTROL: "no-store", hdrs.PRAGMA: "no-cache"}


@dataclass(slots=True)
class Sandbox:
    """Everything one simulator instance holds; tests reach it through ``app[SANDBOX]``."""

    settings: SandboxSettings
    signer: TokenSigner
    state: PosState
    faults: Faults
    clock: Callable[[], float]
    requests: RequestLog
    stats: Stats = field(default_factory=Stats)
    revoked_token_ids: set[str] = field(default_factory=set)
    issued_token_ids: set[str] = field(default_factory=set)

    def issue_token(self, merchant_vat: str | None) -> str:
        now = int(self.clock())
        claims: Json = {
            "nbf": now,
            "exp": now + self.settings.token_lifetime_seconds,
            "iat": now,
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "client_id": self.settings.client_id,
        }
        if merchant_vat is not None:
            claims["merchant_vat"] = merchant_vat
        claims["scope"] = SCOPE
        claims["jti"] = uuid.uuid4().hex
        self.issued_token_ids.add(claims["jti"])
        return self.signer.sign(claims)

    def revoke_tokens(self) -> int:
        """Make every token issued so far answer 401, as a key rotation would."""
        revoked = len(self.issued_token_ids)
        self.revoked_token_ids |= self.issued_token_ids
        self.issued_token_ids = set()
        return revoked

    def reset(self) -> None:
        self.stats = Stats()
        self.requests.clear()
        self.faults.reset(self.settings.faults)


SANDBOX = web.AppKey("sandbox", Sandbox)
MERCHANT_VAT = web.RequestKey("merchant_vat", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_sandbox_app(
    settings: SandboxSettings,
    *,
    signer: TokenSigner | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The whole simulator; ``signer`` and ``clock`` let tests fix the key and the time."""
    sandbox = Sandbox(
        settings=settings,
        signer=signer if signer is not None else TokenSigner.generate(),
        state=PosState(
            clock=clock,
            poll_delay_ms=settings.poll_delay_ms,
            payment_expiry_seconds=settings.payment_expiry_seconds,
        ),
        faults=Faults(settings.faults, random.Random(settings.seed)),
        clock=clock,
        requests=RequestLog(settings.request_log_size),
    )
    app = web.Application(middlewares=[_observe, _errors])
    app[SANDBOX] = sandbox
    app.add_subapp("/integrator-authentication", _token_app())
    app.add_subapp(POS_PREFIX, _pos_app())
    app.add_subapp("/pos/app/usersimulation", _user_simulation_app())
    app.add_subapp(ADMIN_PREFIX, _admin_app())
    return app


# -- middlewares ---------------------------------------------------------------


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Delay, count and remember every MobilePay call; the admin API is left alone."""
    if request.path.startswith(f"{ADMIN_PREFIX}/"):
        return await handler(request)
    sandbox = request.config_dict[SANDBOX]
    if sandbox.faults.settings.latency_ms:
        await asyncio.sleep(sandbox.faults.settings.latency_ms / 1000)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if request.path.startswith(f"{POS_PREFIX}/"):
            sandbox.stats.pos_by_status[status] += 1
        headers = tuple((name, _redact(name, value)) for name, value in request.headers.items())
        sandbox.requests.add(SeenRequest(request.method, request.path_qs, headers, status))


def _redact(name: str, value: str) -> str:
    # Bearer tokens are the simulator's own; a client secret is not.
    if name.lower() == "authorization" and value[:6].lower() == "basic ":
        return "Basic <redacted>"
    return value


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        logger.debug("%s %s: %s %s", request.method, request.path, exc.status, exc)
        if exc.code is None:
            headers = {hdrs.WWW_AUTHENTICATE: "Bearer"} if isinstance(exc, Unauthorized) else None
            return web.Response(status=exc.status, headers=headers)
        return web.json_response(
            {"code": exc.code, "message": exc.message, "correlationId": str(uuid.uuid4())},
            status=exc.status,
        )
    except OAuthError as exc:
        logger.debug("token request refused: %s", exc)
        return web.json_response({"error": exc.error}, status=exc.status, headers=_NO_STORE)


@web.middleware
async def _pos_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Faults first, then the checks MobilePay makes before looking at the call itself."""
    sandbox = request.config_dict[SANDBOX]
    sandbox.stats.pos_requests += 1
    if sandbox.faults.take_unauthorized():
        sandbox.stats.injected_unauthorized += 1
        raise Unauthorized(message="refused by the unauthorized fault")
    error_code = sandbox.faults.take_error()
    if error_code is not None:
        sandbox.stats.injected_errors += 1
        raise InternalError(error_code, "Injected internal error")
    merchant_vat = _authenticate(request.headers, sandbox)
    sandbox.stats.pos_by_merchant_vat[merchant_vat] += 1
    versions = request.headers.getall(CLIENT_SYSTEM_VERSION, [])
    if not versions:
        raise BadRequest("1153", "Missing x-mobilepay-client-system-version header")
    if len(versions) > 1:
        raise BadRequest("1157", "Duplicated x-mobilepay-client-system-version header")
    if not _VERSION_PATTERN.fullmatch(versions[0]):
        raise BadRequest(
            "1160", "Invalid x-mobilepay-client-system-version header: Major.Minor.Build"
        )
    request[MERCHANT_VAT] = merchant_vat
    return await handler(request)


def _single_equal(values: list[str], expected: str) -> bool:
    return len(values) == 1 and hmac.compare_digest(values[0].encode(), expected.encode())


def _authenticate(headers: CIMultiDictProxy[str], sandbox: Sandbox) -> str:
    """The merchant VAT the call acts for, or Unauthorized / BadRequest."""
    if not _single_equal(headers.getall(IBM_CLIENT_ID, []), sandbox.settings.ibm_client_id):
        raise Unauthorized(message="missing or wrong x-ibm-client-id")
    authorizations = headers.getall(hdrs.AUTHORIZATION, [])
    if len(authorizations) != 1:
        raise Unauthorized(message="expected one Authorization header")
    scheme, _, token = authorizations[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(message="expected a bearer token")
    try:
        claims = sandbox.signer.verify(
            token.strip(),
            now=sandbox.clock(),
            audience=sandbox.settings.audience,
            issuer=sandbox.settings.issuer,
        )
    except JwtError as exc:
        raise Unauthorized(message=f"token rejected: {exc}") from exc
    if claims.get("client_id") != sandbox.settings.client_id:
        raise Unauthorized(message="token of another client")
    if claims.get("jti") in sandbox.revoked_token_ids:
        raise Unauthorized(message="token revoked")

    vat_headers = headers.getall(MERCHANT_VAT_HEADER, [])
    if len(vat_headers) > 1:
        raise BadRequest("1155", "Duplicated x-mobilepay-merchant-vat-number header")
    header_vat = vat_headers[0] if vat_headers else None
    if header_vat is not None and not VAT_PATTERN.fullmatch(header_vat):
        raise BadRequest("1159", "Invalid x-mobilepay-merchant-vat-number header")
    claim_vat = claims.get("merchant_vat")
    if claim_vat is None:
        if header_vat is None:
            raise BadRequest("1151", "Missing x-mobilepay-merchant-vat-number header")
        return header_vat
    if not isinstance(claim_vat, str) or not VAT_PATTERN.fullmatch(claim_vat):
        raise BadRequest("1182", "Invalid merchant_vat claim in access token")
    # A token bound to one merchant is worthless for any other.
    if header_vat is not None and header_vat != claim_vat:
        raise Unauthorized(message="token issued for another merchant")
    return claim_vat


# -- request helpers -----------------------------------------------------------


async def _json_body(request: web.Request) -> Json:
    content_type = request.content_type
    if content_type not in _JSON_CONTENT_TYPES and not (
        content_type.startswith("application/") and content_type.endswith("+json")
    ):
        raise UnsupportedMediaType(message=f"content type {content_type!r} is not JSON")
    raw = await request.read()
    if not raw:
        raise BadRequest("1099", "A request body is required")
    try:
        body = json.loads(raw, parse_float=Decimal)
    except ValueError as exc:
        raise BadRequest("1099", "The request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("1099", "The request body must be a JSON object")
    return body


def _path_id(request: web.Request, name: str) -> str:
    try:
        return parse_uuid(request.match_info[name], name)
    except BadRequest as exc:
        raise NotFound from exc


def _query_uuid(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return None if value is None else parse_uuid(value, name)


def _context(request: web.Request) -> tuple[PosState, str]:
    return request.config_dict[SANDBOX].state, request[MERCHANT_VAT]


def _ok() -> web.Response:
    return web.Response(status=200)


# -- token service -------------------------------------------------------------


def _token_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/connect/token", _token)
    app.router.add_get("/.well-known/openid-configuration", _discovery)
    app.router.add_get("/.well-known/openid-configuration/jwks", _jwks)
    return app


def _check_ibm_client_id(request: web.Request, sandbox: Sandbox) -> None:
    if not _single_equal(request.headers.getall(IBM_CLIENT_ID, []), sandbox.settings.ibm_client_id):
        raise OAuthError(401, "invalid_client", "missing or wrong x-ibm-client-id")


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    authorizations = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(authorizations) != 1:
        return None
    scheme, _, encoded = authorizations[0].partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, client_secret = decoded.partition(":")
    return (client_id, client_secret) if colon else None


def _credentials_match(credentials: tuple[str, str], settings: SandboxSettings) -> bool:
    # RFC 6749 has clients form-encode both parts first; many do not.
    client_id, client_secret = credentials
    return any(
        hmac.compare_digest(candidate_id.encode(), settings.client_id.encode())
        & hmac.compare_digest(candidate_secret.encode(), settings.client_secret.encode())
        for candidate_id, candidate_secret in (
            (client_id, client_secret),
            (unquote_plus(client_id), unquote_plus(client_secret)),
        )
    )


async def _token(request: web.Request) -> web.Response:
    sandbox = request.config_dict[SANDBOX]
    settings = sandbox.settings
    sandbox.stats.token_requests += 1
    error_code = sandbox.faults.take_token_error()
    if error_code is not None:
        sandbox.stats.injected_token_errors += 1
        raise InternalError(error_code, "Injected internal error")
    # The API gateway checks its own client id before the token service runs.
    _check_ibm_client_id(request, sandbox)
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthError(400, "invalid_request", "the body must be form-urlencoded")
    credentials = _basic_credentials(request)
    if credentials is None or not _credentials_match(credentials, settings):
        raise OAuthError(401, "invalid_client", "wrong Basic client credentials")
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type")
    merchant_vat = form.get("merchant_vat")
    if merchant_vat is not None and not (
        isinstance(merchant_vat, str) and VAT_PATTERN.fullmatch(merchant_vat)
    ):
        raise OAuthError(400, "invalid_request", "merchant_vat must be DK or FI and 8 digits")
    token = sandbox.issue_token(merchant_vat)
    sandbox.stats.tokens_issued += 1
    if merchant_vat is not None:
        sandbox.stats.tokens_by_merchant_vat[merchant_vat] += 1
    return web.json_response(
        {
            "access_token": token,
            "expires_in": settings.token_lifetime_seconds + EXPIRES_IN_SLACK_SECONDS,
            "token_type": "Bearer",
            "scope": SCOPE,
        },
        headers=_NO_STORE,
    )


async def _discovery(request: web.Request) -> web.Response:
    sandbox = request.config_dict[SANDBOX]
    _check_ibm_client_id(request, sandbox)
    base = request.url.origin().with_path("/integrator-authentication")
    return web.json_response(
        {
            "issuer": sandbox.settings.issuer,
            "jwks_uri": str(base / ".well-known/openid-configuration/jwks"),
            "token_endpoint": str(base / "connect/token"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "scopes_supported": [SCOPE],
            "claims_supported": ["merchant_vat"],
        }
    )


async def _jwks(request: web.Request) -> web.Response:
    sandbox = request.config_dict[SANDBOX]
    _check_ibm_client_id(request, sandbox)
    return web.json_response({"keys": [sandbox.signer.public_jwk()]})


# -- PoS V10 -------------------------------------------------------------------


def _pos_app() -> web.Application:
    app = web.Application(middlewares=[_pos_gate])
    add = app.router
    # /stores/detailed before /stores/{storeid}: routes match in order.
    add.add_get("/stores/detailed", _detailed_stores)
    add.add_get("/stores/{storeid}", _get_store)
    add.add_get("/stores", _find_stores)
    add.add_post("/pointofsales", _create_pos)
    add.add_get("/pointofsales", _find_pos)
    add.add_get("/pointofsales/{posid}", _get_pos)
    add.add_delete("/pointofsales/{posid}", _delete_pos)
    add.add_get("/pointofsales/{posid}/checkin", _get_checkin)
    add.add_post("/payments", _initiate_payment)
    add.add_post("/payments/prepare", _prepare_payment)
    add.add_get("/payments", _find_payments)
    # Not /payments/prepare, which takes only POST (so its 405 says Allow: POST).
    add.add_get("/payments/{paymentid:(?!prepare$)[^{}/]+}", _get_payment)
    add.add_post("/payments/{paymentid}/ready", _ready_payment)
    add.add_post("/payments/{paymentid}/capture", _capture_payment)
    add.add_post("/payments/{paymentid}/cancel", _cancel_payment)
    add.add_post("/refunds", _create_refund)
    add.add_get("/refunds", _find_refunds)
    add.add_get("/refunds/{refundid}", _get_refund)
    add.add_post("/refunds/{refundid}/capture", _capture_refund)
    add.add_post("/refunds/{refundid}/cancel", _cancel_refund)
    return app


async def _idempotent(
    request: web.Request, create: Callable[[PosState, str, Mapping[str, Any]], Json]
) -> web.Response:
    state, merchant_vat = _context(request)
    key = parse_idempotency_key(request.headers.getall(IDEMPOTENCY_KEY, []))
    body = await _json_body(request)
    request_fingerprint = fingerprint(request.method, request.path, body)
    result = state.idempotent(
        merchant_vat, key, request_fingerprint, lambda: create(state, merchant_vat, body)
    )
    return web.json_response(result)


async def _detailed_stores(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    query = request.query
    return web.json_response(
        state.detailed_stores(
            merchant_vat, query.get("merchantBrandId"), query.get("merchantLocationId")
        )
    )


async def _get_store(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.get_store(merchant_vat, _path_id(request, "storeid")))


async def _find_stores(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    query = request.query
    return web.json_response(
        state.find_stores(
            merchant_vat, query.get("merchantBrandId"), query.get("merchantLocationId")
        )
    )


async def _create_pos(request: web.Request) -> web.Response:
    return await _idempotent(request, PosState.create_pos)


async def _find_pos(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(
        state.find_pos(
            merchant_vat,
            _query_uuid(request, "storeId"),
            request.query.get("beaconId"),
            request.query.get("merchantPosId"),
        )
    )


async def _get_pos(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.get_pos(merchant_vat, _path_id(request, "posid")))


async def _delete_pos(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    state.delete_pos(merchant_vat, _path_id(request, "posid"))
    return _ok()


async def _get_checkin(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.get_checkin(merchant_vat, _path_id(request, "posid")))


async def _initiate_payment(request: web.Request) -> web.Response:
    return await _idempotent(request, PosState.initiate_payment)


async def _prepare_payment(request: web.Request) -> web.Response:
    return await _idempotent(request, PosState.prepare_payment)


async def _find_payments(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(
        state.find_payments(
            merchant_vat,
            _query_uuid(request, "posId"),
            request.query.get("orderId"),
            request.query.get("state"),
        )
    )


async def _get_payment(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.get_payment(merchant_vat, _path_id(request, "paymentid")))


async def _ready_payment(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    payment_id = _path_id(request, "paymentid")
    state.ready_payment(merchant_vat, payment_id, await _json_body(request))
    return _ok()


async def _capture_payment(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    payment_id = _path_id(request, "paymentid")
    state.capture_payment(merchant_vat, payment_id, await _json_body(request))
    return _ok()


async def _cancel_payment(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    state.cancel_payment(merchant_vat, _path_id(request, "paymentid"))
    return _ok()


async def _create_refund(request: web.Request) -> web.Response:
    return await _idempotent(request, PosState.create_refund)


async def _find_refunds(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.find_refunds(merchant_vat, _query_uuid(request, "paymentId")))


async def _get_refund(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    return web.json_response(state.get_refund(merchant_vat, _path_id(request, "refundid")))


async def _capture_refund(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    try:
        refund_id = _path_id(request, "refundid")
    except NotFound as exc:
        raise NotFound("1004", "Refund not found") from exc
    state.capture_refund(merchant_vat, refund_id)
    return _ok()


async def _cancel_refund(request: web.Request) -> web.Response:
    state, merchant_vat = _context(request)
    state.cancel_refund(merchant_vat, _path_id(request, "refundid"))
    return _ok()


# -- user simulation -----------------------------------------------------------


def _user_simulation_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/checkin", _user_action(PosState.user_checkin))
    app.router.add_post("/acceptpayment", _user_action(PosState.user_accept_payment))
    app.router.add_post("/cancelpaymentbyuser", _user_action(PosState.user_cancel_payment))
    return app


def _user_action(action: Callable[[PosState, Mapping[str, Any]], None]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        sandbox = request.config_dict[SANDBOX]
        sandbox.stats.user_simulation_requests += 1
        action(sandbox.state, await _json_body(request))
        return _ok()

    return handle


# -- admin ---------------------------------------------------------------------


def _admin_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/faults", _get_faults)
    app.router.add_post("/faults", _set_faults)
    app.router.add_post("/revoke-tokens", _revoke_tokens)
    app.router.add_get("/requests", _seen_requests)
    app.router.add_post("/reset", _reset)
    return app


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[SANDBOX].stats.to_json())


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[SANDBOX].faults.to_json())


async def _set_faults(request: web.Request) -> web.Response:
    faults = request.config_dict[SANDBOX].faults
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object")
        faults.update(changes)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    logger.info("faults now %s", faults.to_json())
    return web.json_response(faults.to_json())


async def _revoke_tokens(request: web.Request) -> web.Response:
    revoked = request.config_dict[SANDBOX].revoke_tokens()
    logger.info("revoked %d tokens", revoked)
    return web.json_response({"revoked": revoked})


async def _seen_requests(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[SANDBOX].requests.to_json())


async def _reset(request: web.Request) -> web.Response:
    sandbox = request.config_dict[SANDBOX]
    sandbox.reset()
    return web.json_response(sandbox.stats.to_json())
