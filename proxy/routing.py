"""Routing: which merchant a request acts for, and which upstream path it may reach.

Pure functions over the raw request target and headers; nothing here touches
the network, so every rule is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
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

# RFC 3986 pchar without ";" (matrix parameters that some servers treat as
# path separators) and without "%", which is checked escape by escape.
# The PoS V10 API uses only these.
ALLOWED_METHODS = frozenset({"GET", "POST", "DELETE"})
ALLOWED_HEADER = ", ".join(sorted(ALLOWED_METHODS))

_PATH_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%]*")
_QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@%/?]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|%([0-9A-Fa-f]{2})")
# Escapes that could change how a path is split or normalised further along.
_FORBIDDEN_PATH_BYTES = frozenset(b"/\\.%") | frozenset(range(0x20)) | {0x7F}

POS_V10_ROUTES = (
    "/pos/v10/payments",
    "/pos/v10/payments/prepare",
    "/pos/v10/payments/{paymentid}",
    "/pos/v10/payments/{paymentid}/ready",
    "/pos/v10/payments/{paymentid}/capture",
    "/pos/v10/payments/{paymentid}/cancel",
    "/pos/v10/pointofsales",
    "/pos/v10/pointofsales/{posid}",
    "/pos/v10/pointofsales/{posid}/checkin",
    "/pos/v10/stores",
    "/pos/v10/stores/detailed",
    "/pos/v10/stores/{storeid}",
    "/pos/v10/refunds",
    "/pos/v10/refunds/{refundid}",
    "/pos/v10/refunds/{refundid}/capture",
    "/pos/v10/refunds/{refundid}/cancel",
    "/pos/app/usersimulation/checkin",
    "/pos/app/usersimulation/acceptpayment",
    "/pos/app/usersimulation/cancelpaymentbyuser",
)
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


class RouteTable:
    """Maps a concrete path to its template, so metric labels stay bounded."""

    def __init__(self, templates: Iterable[str]) -> None:
        self._by_length: dict[int, list[tuple[tuple[str | None, ...], str]]] = {}
        for template in templates:
            parts = tuple(
                None if part.startswith("{") else part for part in template.strip("/").split("/")
            )
            self._by_length.setdefault(len(parts), []).append((parts, template))
        # Literal segments win over parameters: /stores/detailed before /stores/{storeid}.
        for candidates in self._by_length.values():
            candidates.sort(key=lambda item: sum(part is None for part in item[0]))

    def match(self, path: str) -> str:
        parts = path.strip("/").split("/")
        for pattern, template in self._by_length.get(len(parts), ()):
            if all(p is None or p == actual for p, actual in zip(pattern, parts, strict=True)):
                return template
        return UNMATCHED_ROUTE


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
