"""Header hygiene as pure functions: strip first, inject last.

Requests are rewritten as multidicts; responses are relayed from their raw fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

# RFC 9110 section 7.6.1, plus the non-standard names that proxies have used for
# the same purpose (the list Go's httputil.ReverseProxy strips).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Only the proxy may set these towards MobilePay; whatever a terminal sends is dropped.
PROXY_OWNED = frozenset(
    {
        "authorization",
        "x-ibm-client-id",
        "x-mobilepay-merchant-vat-number",
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-request-id",  # the request's id, chosen by the proxy (proxy.request_ids)
        # Framing and negotiation belong to each connection: the upstream client frames
        # the buffered body itself, and the edge has already answered any Expect.
        "content-length",
        "expect",
    }
)

# Framing of the relayed response is recomputed for the terminal's connection,
# X-Proxy-Error marks the proxy's own answers only (MobilePay's errors must not pass for
# them), and X-Request-Id is the proxy's, set on every answer.
RESPONSE_STRIPPED = HOP_BY_HOP | {"content-length", "x-proxy-error", "x-request-id"}
_RESPONSE_STRIPPED_BYTES = frozenset(name.encode("ascii") for name in RESPONSE_STRIPPED)
# Connection values that list no other field (both are stripped anyway).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def connection_listed(headers: MultiMapping[str]) -> frozenset[str]:
    """Lower-cased names listed in any Connection header (they are hop-by-hop too)."""
    values = headers.getall("connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def request_strip_set(routing_header: str) -> frozenset[str]:
    """The request header names to drop for a given routing header name."""
    return HOP_BY_HOP | PROXY_OWNED | {routing_header.lower()}


def copy_without(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Every header except the dropped names, those named in Connection, and any name with
    an underscore.

    Underscored names are dropped as nginx does by default (``underscores_in_headers off``):
    a server that maps ``_`` to ``-`` (CGI style) would take ``x_ibm_client_id`` for the
    header the proxy owns, and no PoS V10 header has one.
    """
    if "Connection" in headers:
        drop = drop | connection_listed(headers)
    return CIMultiDict(
        [
            (name, value)
            for name, value in headers.items()
            if "_" not in name and name.lower() not in drop
        ]
    )


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    drop: frozenset[str],
    *,
    token: str,
    ibm_client_id: str,
    vat: str,
    peer: str | None,
) -> CIMultiDict[str]:
    """The headers sent to MobilePay: the terminal's end-to-end headers plus credentials."""
    headers = copy_without(incoming, drop)
    if peer:
        headers["X-Forwarded-For"] = peer
        headers["Forwarded"] = forwarded_for(peer)
    headers["X-Forwarded-Proto"] = "http"
    headers["Authorization"] = f"Bearer {token}"
    headers["x-ibm-client-id"] = ibm_client_id
    headers["X-MobilePay-Merchant-VAT-Number"] = vat
    return headers


def forwarded_for(peer: str) -> str:
    """An RFC 7239 ``Forwarded`` value for the peer; IPv6 addresses are quoted and bracketed."""
    return f'for="[{peer}]"' if ":" in peer else f"for={peer}"


class RelayedHead(NamedTuple):
    """MobilePay's end-to-end response header lines, serialised for the terminal."""

    lines: bytes
    dated: bool  # a Date line is among them


def relayed_head(fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]) -> RelayedHead:
    """The response header fields to relay to the terminal, serialised as they arrived.

    ``names`` are the fields' names lower-cased, as the response parser has them already.
    Works on the upstream's bytes rather than a multidict: decoding every field, building
    a dict and encoding it again cost about 3 % of the proxy's CPU per request.
    """
    listed = _connection_listed_bytes(fields, names)
    stripped = _RESPONSE_STRIPPED_BYTES
    parts: list[bytes] = []
    for name, (raw_name, value) in zip(names, fields, strict=False):
        if name not in stripped and name not in listed:
            parts += (raw_name, b": ", value, b"\r\n")
    return RelayedHead(b"".join(parts), b"date" in names)


def _connection_listed_bytes(
    fields: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]
) -> set[bytes]:
    """Lower-cased names listed in the Connection fields (found by index: it is faster)."""
    listed: set[bytes] = set()
    position = -1
    for _ in range(names.count(b"connection")):
        position = names.index(b"connection", position + 1)
        value = fields[position][1].lower()
        if value not in _PLAIN_CONNECTION:  # almost every response: nothing to split
            listed.update([token.strip() for token in value.split(b",")])
    return listed
