"""Property: whatever a terminal sends, MobilePay sees only the proxy's credentials and paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import ProxyError
from proxy.headers import request_strip_set, upstream_request_headers
from proxy.routing import check_prefix, parse_target

PREFIXES = ("/pos/v10/",)
OWNED = ["Authorization", "x-ibm-client-id", "X-MobilePay-Merchant-VAT-Number"]
token_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
names = st.one_of(
    st.sampled_from(
        [
            *OWNED,
            "authorization",
            "X-IBM-CLIENT-ID",
            "Connection",
            "Host",
            "X-Merchant-Id",
            "Forwarded",
            "X-Forwarded-For",
            "Keep-Alive",
            "TE",
        ]
    ),
    st.text(token_chars, min_size=1, max_size=20),
)
values = st.one_of(
    st.sampled_from(
        [
            "Authorization",
            "x-ibm-client-id, Authorization",
            "Bearer forged",
            "close",
            "X-MobilePay-Merchant-VAT-Number",
            "DK99999999",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
segment = st.one_of(
    st.sampled_from(
        [
            "pos",
            "v10",
            "payments",
            "..",
            ".",
            "",
            "%2e%2e",
            "%2f",
            "%252e",
            "a;b",
            "%",
            "%zz",
            "x%2F",
            "..%2f",
            "%5c",
            "%2E",
        ]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
)
paths = st.lists(segment, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(st.tuples(names, values), max_size=12))
def test_upstream_never_sees_terminal_credentials(headers: list[tuple[str, str]]) -> None:
    sent = upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(headers)),
        request_strip_set("X-Merchant-Id"),
        token="proxy-token",
        ibm_client_id="proxy-ibm",
        vat="DK12345678",
        peer="10.0.0.1",
    )
    assert sent.getall("Authorization") == ["Bearer proxy-token"]
    assert sent.getall("x-ibm-client-id") == ["proxy-ibm"]
    assert sent.getall("X-MobilePay-Merchant-VAT-Number") == ["DK12345678"]
    assert sent.getall("X-Forwarded-For") == ["10.0.0.1"]
    assert "X-Merchant-Id" not in sent
    assert "Connection" not in sent
    assert "Host" not in sent


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(raw=st.one_of(paths, st.tuples(paths, st.text(max_size=10)).map("?".join)))
def test_accepted_paths_stay_under_the_prefix(raw: str) -> None:
    try:
        target = parse_target(raw)
        check_prefix(target.path, PREFIXES)
    except ProxyError:
        return
    # What is forwarded resolves, by any reading of the URL, under the allowed prefix.
    url = URL("https://api.example" + target.path, encoded=True)
    for reading in (url.path, url.raw_path, URL("https://api.example").join(url).path):
        assert reading.startswith("/pos/v10/")
        assert "/../" not in reading + "/"
        assert "/./" not in reading + "/"
    assert "//" not in target.path
    assert "%2f" not in target.path.lower()
