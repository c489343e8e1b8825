"""Schemathesis checks for tests/test_spec.py, loaded with ``SCHEMATHESIS_HOOKS=tests.spec_checks``.

``KNOWN_DIFFERENCES`` is the one list of refusals of schema-valid requests that are right:
the real MobilePay enforced these rules beyond what pos.yaml's schemas say (its API errors
page lists each code for its endpoint), and the simulator follows it; or the proxy refuses
a target it will not forward. Each is allowed only on the operations it belongs to.
``X-MobilePay-Client-System-Version`` and the VAT header are sent right by the test (as a
terminal and the proxy do), so 1159 and 1160 are not met.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

from tests.pos_spec import error_response_problems

STORES = ("GET /pos/v10/stores", "GET /pos/v10/stores/detailed")
CREATING = ("POST /pos/v10/payments", "POST /pos/v10/payments/prepare")
USER_SIMULATION = tuple(
    f"POST /pos/app/usersimulation/{action}"
    for action in ("checkin", "acceptpayment", "cancelpaymentbyuser")
)
QUERIES = ("GET /pos/v10/payments", "GET /pos/v10/pointofsales", "GET /pos/v10/refunds", *STORES)

# error code -> (the rule, the operations where a schema-valid request may break it)
KNOWN_DIFFERENCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "1099": (
        "the user simulation needs the beaconId of an existing point of sale; "
        "supportedBeaconTypes must be distinct values of QR, NFC, Bluetooth",
        (*USER_SIMULATION, "POST /pos/v10/pointofsales"),
    ),
    "1102": (
        "an amount is positive with at most two decimals",
        (*CREATING, "POST /pos/v10/refunds"),
    ),
    "1109": ("payment filter not specific enough", ("GET /pos/v10/payments",)),
    "1110": ("refund filter not specific enough", ("GET /pos/v10/refunds",)),
    "1111": ("invalid merchantPosId", ("POST /pos/v10/pointofsales",)),
    "1112": ("invalid point of sale name", ("POST /pos/v10/pointofsales",)),
    "1113": ("invalid orderId", CREATING),
    "1114": ("invalid refundOrderId", ("POST /pos/v10/refunds",)),
    "1119": ("invalid merchantBrandId", STORES),
    "1120": ("invalid merchantLocationId", STORES),
    "1121": ("point of sale filter not specific enough", ("GET /pos/v10/pointofsales",)),
    "1122": ("store filter not specific enough", ("GET /pos/v10/stores",)),
    "1162": (
        "X-MobilePay-Idempotency-Key is 1 to 36 characters",
        (*CREATING, "POST /pos/v10/pointofsales", "POST /pos/v10/refunds"),
    ),
    # The proxy's own: a query it refuses rather than forward (see README, Errors).
    "invalid_query": ("an encoded control character in the query string", QUERIES),
}
# Refusals any schema-valid request may meet: no such resource, a state conflict.
ACCEPTED_STATUSES = frozenset({401, 403, 404, 409, 429})


def _header(response: schemathesis.Response, name: str) -> str | None:
    values = response.headers.get(name.lower())
    return values[0] if values else None


def _body(response: schemathesis.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


@schemathesis.check
def proxy_errors_are_error_responses(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """Every answer of the proxy's own is an ErrorResponse naming its X-Proxy-Error code."""
    code = _header(response, "X-Proxy-Error")
    if code is None:
        return None
    body = _body(response)
    problems = error_response_problems(body)
    if problems:
        raise AssertionError(f"the proxy's {code} answer is not an ErrorResponse: {problems}")
    if body["code"] != code or body["correlationId"] != _header(response, "X-Request-Id"):
        raise AssertionError(f"the proxy's {code} answer has the wrong code or correlationId")
    return True


@schemathesis.check
def schema_valid_requests_are_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """A schema-valid request is accepted, unless refused for a reason in KNOWN_DIFFERENCES."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ACCEPTED_STATUSES:
        return None
    body = _body(response)
    code = body.get("code") if isinstance(body, dict) else None
    known = KNOWN_DIFFERENCES.get(code) if isinstance(code, str) else None
    if known is not None and case.operation.label in known[1]:
        return True
    raise AssertionError(
        f"a schema-valid request to {case.operation.label} was refused with {status} and "
        f"code {code!r}, which is not a known difference"
    )
