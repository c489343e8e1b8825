"""Header hygiene, mirroring the cases Go's httputil.ReverseProxy tests name."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import (
    HOP_BY_HOP,
    PROXY_OWNED,
    request_strip_set,
    response_headers,
    upstream_request_headers,
)

RFC9110_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
}


def _proxy(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _upstream(*pairs: tuple[str, str], peer: str | None = "10.0.0.7") -> CIMultiDict[str]:
    return upstream_request_headers(
        _proxy(*pairs),
        request_strip_set("X-Merchant-Id"),
        token="tok",
        ibm_client_id="ibm",
        vat="DK12345678",
        peer=peer,
    )


def test_hop_by_hop_names_are_each_a_single_lowercase_name() -> None:
    # A missing comma once merged two names into one; each must stand alone.
    assert RFC9110_HOP_BY_HOP == HOP_BY_HOP
    for name in HOP_BY_HOP | PROXY_OWNED:
        assert name == name.lower()
        assert " " not in name


def test_strip_headers_present_in_connection() -> None:
    headers = _upstream(
        ("Connection", "X-Foo, x-ibm-client-id"),
        ("Connection", "Authorization"),
        ("X-Foo", "1"),
        ("X-Keep", "2"),
        ("Keep-Alive", "timeout=5"),
    )
    assert "X-Foo" not in headers
    assert "Connection" not in headers
    assert "Keep-Alive" not in headers
    assert headers["X-Keep"] == "2"
    # Injected after stripping: Connection cannot delete the proxy's credentials.
    assert headers.getall("Authorization") == ["Bearer tok"]
    assert headers.getall("x-ibm-client-id") == ["ibm"]


def test_terminal_credentials_and_routing_are_replaced() -> None:
    headers = _upstream(
        ("Authorization", "Bearer forged"),
        ("Authorization", "Basic Zm9vOmJhcg=="),
        ("X-IBM-Client-Id", "forged"),
        ("X-MobilePay-Merchant-VAT-Number", "DK99999999"),
        ("X-Merchant-Id", "store-017"),
        ("Host", "evil"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "evil"),
        ("Forwarded", "for=1.2.3.4"),
        ("Proxy-Authorization", "Basic x"),
    )
    assert headers.getall("Authorization") == ["Bearer tok"]
    assert headers.getall("x-ibm-client-id") == ["ibm"]
    assert headers.getall("X-MobilePay-Merchant-VAT-Number") == ["DK12345678"]
    assert headers.getall("X-Forwarded-For") == ["10.0.0.7"]
    assert headers.getall("Forwarded") == ["for=10.0.0.7"]
    for name in ("X-Merchant-Id", "Host", "X-Forwarded-Host", "Proxy-Authorization"):
        assert name not in headers


def test_end_to_end_headers_pass_unchanged_including_repeats() -> None:
    headers = _upstream(
        ("X-MobilePay-Idempotency-Key", "key-1"),
        ("X-MobilePay-Client-System-Version", "1.2.3"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Accept", "text/plain"),
    )
    assert headers["X-MobilePay-Idempotency-Key"] == "key-1"
    assert headers["X-MobilePay-Client-System-Version"] == "1.2.3"
    assert headers.getall("Accept") == ["application/json", "text/plain"]


def test_ipv6_peer_is_quoted_in_forwarded() -> None:
    headers = _upstream(peer="::1")
    assert headers["Forwarded"] == 'for="[::1]"'
    assert headers["X-Forwarded-For"] == "::1"


def test_response_hop_by_hop_and_connection_listed_are_stripped() -> None:
    headers = response_headers(
        CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("Connection", "close, X-Internal"),
                ("X-Internal", "secret-ish"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "10"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Content-Encoding", "gzip"),
            ]
        )
    )
    assert list(headers.items()) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
    ]
