"""Routing: which merchant a request acts for, and which upstream path it may reach.

Pure functions over the raw request target and headers; nothing here touches
the network, so every rule is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.config import ROUTING_KEY_PATTERN, Merchant
from proxy.errors import (
    AbsoluteTarget,
    InvalidPath,
    InvalidQuery,
    InvalidRoutingHeader,
    MissingRoutingHeader,
    SourceNotAllowed,
    UnknownMerchant,
    UnknownRoute,
)

# Every method the proxy forwards on some route (all the PoS V10 API uses).
ALLOWED_METHODS = frozenset({"GET", "POST", "DELETE"})
ALLOWED_HEADER = ", ".join(sorted(ALLOWED_METHODS))

# RFC 3986 pchar without ";" (matrix parameters that some servers treat as
# path separators) and without "%", which is checked escape by escape.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%]*")
_QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%/?]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%([0-9A-Fa-f]{2})")
# Escapes that could change how a path is split or normalised further along.
_FORBIDDEN_PATH_BYTES = frozenset(b"/\\.%") | frozenset(range(0x20)) | {0x7F}

# The paths of MobilePay's pos.yaml (v10.2.6) with the methods it defines for each;
# tests/test_spec.py checks this table against the published description.
POS_V10_ROUTES: dict[str, frozenset[str]] = {
    "/pos/v10/payments": frozenset({"GET", "POST"}),
    "/pos/v10/payments/prepare": frozenset({"POST"}),
    "/pos/v10/payments/{paymentid}": frozenset({"GET"}),
    "/pos/v10/payments/{paymentid}/ready": frozenset({"POST"}),
    "/pos/v10/payments/{paymentid}/capture": frozenset({"POST"}),
    "/pos/v10/payments/{paymentid}/cancel": frozenset({"POST"}),
    "/pos/v10/pointofsales": frozenset({"GET", "POST"}),
    "/pos/v10/pointofsales/{posid}": frozenset({"GET", "DELETE"}),
    "/pos/v10/pointofsales/{posid}/checkin": frozenset({"GET"}),
    "/pos/v10/stores": frozenset({"GET"}),
    "/pos/v10/stores/detailed": frozenset({"GET"}),
    "/pos/v10/stores/{storeid}": frozenset({"GET"}),
    "/pos/v10/refunds": frozenset({"GET", "POST"}),
    "/pos/v10/refunds/{refundid}": frozenset({"GET"}),
    "/pos/v10/refunds/{refundid}/capture": frozenset({"POST"}),
    "/pos/v10/refunds/{refundid}/cancel": frozenset({"POST"}),
    "/pos/app/usersimulation/checkin": frozenset({"POST"}),
    "/pos/app/usersimulation/acceptpayment": frozenset({"POST"}),
    "/pos/app/usersimulation/cancelpaymentbyuser": frozenset({"POST"}),
}
UNMATCHED_ROUTE = "unmatched"


@dataclass(frozen=True, slots=True)
class Target:
    """A validated origin-form request target, still percent-encoded as received."""

    path: str
    query: str


def parse_target(raw: str) -> Target:
    """Split and validate a raw request target; reject anything ambiguous."""
    if not raw.startswith("/"):
        if raw == "*" or "://" in raw or raw.startswith(("http:", "https:")):
            raise AbsoluteTarget()
        raise InvalidPath("The request target must be an absolute path.")
    path, sep, query = raw.partition("?")
    _check_path(path)
    if sep:
        _check_query(query)
    return Target(path=path, query=query)


def _check_path(path: str) -> None:
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                continue  # a trailing slash
            raise InvalidPath("The path contains an empty segment ('//').")
        if not _PATH_SEGMENT.fullmatch(segment):
            raise InvalidPath("The path contains characters that are not allowed.")
        for match in _ESCAPE.finditer(segment):
            if match.group(1) is None or int(match.group(1), 16) in _FORBIDDEN_PATH_BYTES:
                raise InvalidPath("The path contains an encoded separator, dot or bad escape.")
            if int(match.group(1), 16) >= 0x80:
                raise InvalidPath("The path contains an encoded non-ASCII byte.")
        if segment in (".", ".."):
            raise InvalidPath("The path contains a dot segment.")


def _check_query(query: str) -> None:
    if not _QUERY.fullmatch(query):
        raise InvalidQuery("The query string contains characters that are not allowed.")
    for match in _ESCAPE.finditer(query):
        if match.group(1) is None:
            raise InvalidQuery("The query string contains a malformed percent escape.")
        value = int(match.group(1), 16)
        if value < 0x20 or value == 0x7F:
            raise InvalidQuery("The query string contains an encoded control character.")


def check_prefix(path: str, prefixes: tuple[str, ...]) -> None:
    if not path.startswith(prefixes):
        raise UnknownRoute("This path is not served by the proxy.")


@dataclass(frozen=True, slots=True)
class Route:
    """A path template and the methods forwarded on it (``allow`` is its ``Allow`` value)."""

    template: str
    methods: frozenset[str]
    allow: str

    @classmethod
    def of(cls, template: str, methods: frozenset[str]) -> Route:
        return cls(template, methods, ", ".join(sorted(methods)))


# A path under an allowed prefix that no template matches is forwarded with any of the
# proxy's methods; MobilePay answers for it (with 404, for the PoS V10 API).
UNMATCHED = Route.of(UNMATCHED_ROUTE, ALLOWED_METHODS)


class RouteTable:
    """Maps a concrete path to its route, so metric labels stay bounded and 405s are exact."""

    def __init__(self, routes: Mapping[str, frozenset[str]]) -> None:
        self._by_length: dict[int, list[tuple[tuple[str | None, ...], Route]]] = {}
        for template, methods in routes.items():
            parts = tuple(
                None if part.startswith("{") else part for part in template.strip("/").split("/")
            )
            self._by_length.setdefault(len(parts), []).append((parts, Route.of(template, methods)))
        # Literal segments win over parameters: /stores/detailed before /stores/{storeid}.
        for candidates in self._by_length.values():
            candidates.sort(key=lambda item: sum(part is None for part in item[0]))

    def match(self, path: str) -> Route:
        parts = path.strip("/").split("/")
        for pattern, route in self._by_length.get(len(parts), ()):
            if all(p is None or p == actual for p, actual in zip(pattern, parts, strict=True)):
                return route
        return UNMATCHED


def resolve_merchant(
    headers: CIMultiDictProxy[str], header: str, merchants: Mapping[str, Merchant]
) -> Merchant:
    """The merchant named by the routing header; one value, a plain token, a known key."""
    values = headers.getall(header, ())
    if not values:
        raise MissingRoutingHeader(f"The {header} header is required.")
    if len(values) > 1:
        raise InvalidRoutingHeader(f"The {header} header must be sent exactly once.")
    key = values[0]
    if not ROUTING_KEY_PATTERN.fullmatch(key):
        raise InvalidRoutingHeader(
            f"The {header} header must be one merchant key: "
            "1-64 letters, digits, '.', '_', ':' or '-'."
        )
    merchant = merchants.get(key)
    if merchant is None:
        raise UnknownMerchant(f"The merchant key {key!r} is not configured.")
    return merchant


def check_source(merchant: Merchant, peer: str | None) -> None:
    """Enforce the merchant's optional source networks against the real peer address."""
    if not merchant.networks:
        return
    try:
        address = ipaddress.ip_address((peer or "").split("%", 1)[0])
    except ValueError:
        raise SourceNotAllowed("The request's source address cannot be checked.") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not any(address in network for network in merchant.networks):
        raise SourceNotAllowed(
            f"Terminals of merchant key {merchant.key!r} may not connect from this address."
        )
