"""Header hygiene, mirroring the cases Go's httputil.ReverseProxy tests name."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import (
    HOP_BY_HOP,
    PROXY_OWNED,
    relayed_head,
    request_strip_set,
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
    fields = [
        (b"Content-Type", b"application/json"),
        (b"Connection", b"close, X-Internal"),
        (b"x-internal", b"secret-ish"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"X-Request-Id", b"upstream-own-id"),
        (b"X-Proxy-Error", b"upstream_timeout"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Encoding", b"gzip"),
    ]
    relayed = relayed_head(fields, [name.lower() for name, _ in fields])
    assert relayed.lines == (
        b"Content-Type: application/json\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Encoding: gzip\r\n"
    )
    assert not relayed.dated


def test_response_fields_pass_as_their_bytes_and_a_date_is_noticed() -> None:
    fields = [(b"date", b"Tue, 01 Dec 2026 10:00:00 GMT"), (b"X-Note", b"caf\xe9 \x80")]
    relayed = relayed_head(fields, [name.lower() for name, _ in fields])
    assert relayed.lines == b"date: Tue, 01 Dec 2026 10:00:00 GMT\r\nX-Note: caf\xe9 \x80\r\n"
    assert relayed.dated


def test_every_connection_field_is_read_whatever_its_case() -> None:
    fields = [
        (b"Connection", b"Keep-Alive"),
        (b"X-Kept", b"1"),
        (b"connection", b"X-Hop"),
        (b"X-HOP", b"2"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    relayed = relayed_head(fields, [name.lower() for name, _ in fields])
    assert relayed.lines == b"X-Kept: 1\r\n"
