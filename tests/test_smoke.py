from tests.conftest import RunningProxy
from tests.fakes import PosServer, TokenServer


async def test_get_is_forwarded_with_credentials(
    proxy: RunningProxy, pos_server: PosServer, token_server: TokenServer
) -> None:
    status, headers, body = await proxy.request("GET", "/pos/v10/payments/abc?x=1")
    assert status == 200, body
    received = pos_server.requests[0]
    assert received.path_qs == "/pos/v10/payments/abc?x=1"
    assert received.headers["Authorization"] == f"Bearer {token_server.issued[0]}"
