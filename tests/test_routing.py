"""Pure routing rules: targets, prefixes, route templates, merchant keys, source networks."""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Merchant
from proxy.errors import (
    AbsoluteTarget,
    InvalidPath,
    InvalidQuery,
    InvalidRoutingHeader,
    MissingRoutingHeader,
    ProxyError,
    SourceNotAllowed,
    UnknownMerchant,
    UnknownRoute,
)
from proxy.routing import (
    POS_V10_ROUTES,
    UNMATCHED_ROUTE,
    RouteTable,
    check_prefix,
    check_source,
    parse_target,
    resolve_merchant,
)

MERCHANTS = {"store-017": Merchant("store-017", "DK12345678")}


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/pos/v10/payments", "/pos/v10/payments", ""),
        ("/pos/v10/payments?posId=a&orderId=b", "/pos/v10/payments", "posId=a&orderId=b"),
        ("/pos/v10/payments/", "/pos/v10/payments/", ""),
        ("/pos/v10/payments?orderId=%C3%A6%20x", "/pos/v10/payments", "orderId=%C3%A6%20x"),
        ("/pos/v10/stores/a-b_c.d~e", "/pos/v10/stores/a-b_c.d~e", ""),
    ],
)
def test_valid_targets_are_kept_as_received(raw: str, path: str, query: str) -> None:
    target = parse_target(raw)
    assert (target.path, target.query) == (path, query)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("http://evil/pos/v10/payments", AbsoluteTarget),
        ("https://evil/pos/v10/payments", AbsoluteTarget),
        ("*", AbsoluteTarget),
        ("evil:443", InvalidPath),
        ("/pos/v10/../x", InvalidPath),
        ("/pos/v10/./payments", InvalidPath),
        ("/pos/v10/payments/..", InvalidPath),
        ("/pos/v10/%2e%2e/x", InvalidPath),
        ("/pos/v10/%2E%2E/x", InvalidPath),
        ("/pos/v10/.%2e/x", InvalidPath),
        ("/pos/v10/a%2fb", InvalidPath),
        ("/pos/v10/a%2Fb", InvalidPath),
        ("/pos/v10/a%5cb", InvalidPath),
        ("/pos/v10/%252e%252e/x", InvalidPath),
        ("/pos/v10/a%zz", InvalidPath),
        ("/pos/v10/a%2", InvalidPath),
        ("/pos/v10/a%00", InvalidPath),
        ("/pos/v10/a%c3%a6", InvalidPath),
        ("//pos/v10/payments", InvalidPath),
        ("/pos//v10/payments", InvalidPath),
        ("/pos/v10/payments;jsessionid=1", InvalidPath),
        ("/pos/v10/pay ments", InvalidPath),
        ("/pos/v10/pay\\ments", InvalidPath),
        ("/pos/v10/payments#frag", InvalidPath),
        ("/pos/v10/payments?a;b", InvalidQuery),
        ("/pos/v10/payments?a=%zz", InvalidQuery),
        ("/pos/v10/payments?a=%4", InvalidQuery),
        ("/pos/v10/payments?a=%0d%0a", InvalidQuery),
        ("/pos/v10/payments?a=b c", InvalidQuery),
    ],
)
def test_ambiguous_targets_are_rejected(raw: str, error: type[ProxyError]) -> None:
    with pytest.raises(error):
        parse_target(raw)


def test_prefixes_are_enforced_on_whole_segments() -> None:
    check_prefix("/pos/v10/payments", ("/pos/v10/",))
    for path in ("/pos/v10", "/pos/v100/payments", "/pos/v9/payments", "/metrics", "/"):
        with pytest.raises(UnknownRoute):
            check_prefix(path, ("/pos/v10/",))


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/pos/v10/payments", "/pos/v10/payments"),
        ("/pos/v10/payments/prepare", "/pos/v10/payments/prepare"),
        ("/pos/v10/payments/3fa85f64", "/pos/v10/payments/{paymentid}"),
        ("/pos/v10/payments/3fa85f64/capture", "/pos/v10/payments/{paymentid}/capture"),
        ("/pos/v10/stores/detailed", "/pos/v10/stores/detailed"),
        ("/pos/v10/stores/s1", "/pos/v10/stores/{storeid}"),
        ("/pos/v10/pointofsales/p1/checkin", "/pos/v10/pointofsales/{posid}/checkin"),
        ("/pos/v10/refunds/r1/cancel", "/pos/v10/refunds/{refundid}/cancel"),
        ("/pos/v10/payments/", "/pos/v10/payments"),
        ("/pos/v10/anything/else/entirely", UNMATCHED_ROUTE),
        ("/pos/v10/payments/x/unknown", UNMATCHED_ROUTE),
    ],
)
def test_route_templates(path: str, template: str) -> None:
    assert RouteTable(POS_V10_ROUTES).match(path).template == template


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_routing_header_resolves_merchant() -> None:
    merchant = resolve_merchant(
        _headers(("x-merchant-id", "store-017")), "X-Merchant-Id", MERCHANTS
    )
    assert merchant.vat == "DK12345678"


@pytest.mark.parametrize(
    ("pairs", "error"),
    [
        ((), MissingRoutingHeader),
        ((("X-Merchant-Id", ""),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store-017"), ("X-Merchant-Id", "store-017")), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store-017,store-018"),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store-017 "),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "störe-017"),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store\r\n017"),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store\x00017"),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "s" * 65),), InvalidRoutingHeader),
        ((("X-Merchant-Id", "store-018"),), UnknownMerchant),
        ((("X-Merchant-Id", "STORE-017"),), UnknownMerchant),
    ],
)
def test_bad_routing_headers(pairs: tuple[tuple[str, str], ...], error: type[ProxyError]) -> None:
    with pytest.raises(error):
        resolve_merchant(_headers(*pairs), "X-Merchant-Id", MERCHANTS)


def test_source_networks() -> None:
    open_merchant = Merchant("a", "DK12345678")
    check_source(open_merchant, "203.0.113.9")
    limited = Merchant(
        "b",
        "DK12345678",
        (ipaddress.ip_network("10.1.17.0/24"), ipaddress.ip_network("fd00::/8")),
    )
    for peer in ("10.1.17.5", "::ffff:10.1.17.5", "fd00::1"):
        check_source(limited, peer)
    outside: tuple[str | None, ...] = ("10.1.18.5", "127.0.0.1", "::1", None, "not-an-ip")
    for peer_outside in outside:
        with pytest.raises(SourceNotAllowed):
            check_source(limited, peer_outside)
