"""Real simulators on real sockets, over TLS, with a real aiohttp client."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sandbox.jwt import TokenSigner
from proxy.sandbox.server import RunningSandbox, serve
from proxy.sandbox.settings import SandboxSettings, TlsSettings
from proxy.sandbox.tls import ensure_tls_files

CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret"
IBM_CLIENT_ID = "demo-ibm-client"
VAT = "DK12345678"
OTHER_VAT = "DK87654321"
VERSION = "1.2.3"


class FakeClock:
    """Wall-clock time that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.raw[:200]!r}>"


class SandboxClient:
    """A client of one running simulator, with shortcuts for the usual headers."""

    def __init__(self, session: aiohttp.ClientSession, running: RunningSandbox) -> None:
        self.session = session
        self.running = running
        self.url = running.url

    @property
    def sandbox(self) -> Any:
        return self.running.sandbox

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Any = None,
        json_body: Any = None,
        data: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        async with self.session.request(
            method,
            self.url.with_path(path),
            headers=headers,
            json=json_body,
            data=data,
            params=params,
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    async def token_answer(
        self,
        form: Mapping[str, str] | None = None,
        *,
        authorization: str | None = None,
        ibm_client_id: str | None = IBM_CLIENT_ID,
    ) -> Answer:
        headers = {"Authorization": authorization or basic()}
        if ibm_client_id is not None:
            headers["X-IBM-Client-Id"] = ibm_client_id
        return await self.request(
            "POST",
            "/integrator-authentication/connect/token",
            headers=headers,
            data=dict(form) if form is not None else {"grant_type": "client_credentials"},
        )

    async def token(self, vat: str | None = VAT) -> str:
        form = {"grant_type": "client_credentials"}
        if vat is not None:
            form["merchant_vat"] = vat
        answer = await self.token_answer(form)
        assert answer.status == 200, answer
        return str(answer.json["access_token"])

    def pos_headers(
        self,
        token: str,
        *,
        idempotency_key: str | None = None,
        vat: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {token}",
            "X-IBM-Client-Id": IBM_CLIENT_ID,
            "X-MobilePay-Client-System-Version": VERSION,
        }
        if idempotency_key is not None:
            headers["X-MobilePay-Idempotency-Key"] = idempotency_key
        if vat is not None:
            headers["X-MobilePay-Merchant-VAT-Number"] = vat
        headers.update(extra or {})
        return headers

    async def pos(
        self,
        method: str,
        path: str,
        token: str,
        *,
        json_body: Any = None,
        key: str | None = None,
        params: Mapping[str, str] | None = None,
        vat: str | None = None,
    ) -> Answer:
        return await self.request(
            method,
            f"/pos/v10{path}",
            headers=self.pos_headers(token, idempotency_key=key, vat=vat),
            json_body=json_body,
            params=params,
        )

    async def first_store(self, token: str) -> str:
        answer = await self.pos("GET", "/stores/detailed", token)
        assert answer.status == 200, answer
        return str(answer.json[0]["storeId"])

    async def create_pos(self, token: str, **fields: Any) -> tuple[str, str]:
        """A new point of sale: its posId and beaconId."""
        body = {
            "merchantPosId": f"pos-{uuid.uuid4().hex[:8]}",
            "storeId": await self.first_store(token),
            "name": "Register #1",
            "beaconId": str(uuid.uuid4()),
            "supportedBeaconTypes": ["QR", "Bluetooth"],
            **fields,
        }
        answer = await self.pos("POST", "/pointofsales", token, json_body=body, key=new_key())
        assert answer.status == 200, answer
        return str(answer.json["posId"]), str(body["beaconId"])

    async def initiate(self, token: str, pos_id: str, amount: float = 12.5) -> str:
        body = payment_body(pos_id, amount)
        answer = await self.pos("POST", "/payments", token, json_body=body, key=new_key())
        assert answer.status == 200, answer
        return str(answer.json["paymentId"])

    async def payment(self, token: str, payment_id: str) -> Any:
        answer = await self.pos("GET", f"/payments/{payment_id}", token)
        assert answer.status == 200, answer
        return answer.json

    async def reserved_payment(
        self, token: str, amount: float = 12.5, phone_number: str = "+4520031801"
    ) -> str:
        """A payment the user has accepted, on a point of sale of its own."""
        pos_id, beacon_id = await self.create_pos(token)
        payment_id = await self.initiate(token, pos_id, amount)
        assert (await self.user("checkin", beacon_id, phone_number)).status == 200
        assert (await self.user("acceptpayment", beacon_id, phone_number)).status == 200
        return payment_id

    async def captured_payment(self, token: str, amount: float = 12.5) -> str:
        payment_id = await self.reserved_payment(token, amount)
        capture = await self.pos(
            "POST", f"/payments/{payment_id}/capture", token, json_body={"amount": amount}
        )
        assert capture.status == 200, capture
        return payment_id

    async def user(self, action: str, beacon_id: str, phone_number: str | None) -> Answer:
        body = {"beaconId": beacon_id}
        if phone_number is not None:
            body["phoneNumber"] = phone_number
        return await self.request("POST", f"/pos/app/usersimulation/{action}", json_body=body)

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        answer = await self.request(method, f"/_sandbox{path}", json_body=body)
        assert answer.status == 200, answer
        return answer.json


def new_key() -> str:
    return str(uuid.uuid4())


def payment_body(pos_id: str, amount: float = 12.5, **fields: Any) -> dict[str, Any]:
    return {
        "posId": pos_id,
        "orderId": f"order-{uuid.uuid4().hex[:8]}",
        "amount": amount,
        "currencyCode": "DKK",
        "plannedCaptureDelay": "None",
        **fields,
    }


StartSandbox = Callable[..., Awaitable[SandboxClient]]


@pytest.fixture(scope="session")
def signer() -> TokenSigner:
    return TokenSigner.generate()


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    ensure_tls_files(directory)
    return directory


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start_sandbox(
    signer: TokenSigner, tls_dir: Path, clock: FakeClock
) -> AsyncIterator[StartSandbox]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, key: TokenSigner | None = None, **overrides: Any) -> SandboxClient:
            settings = SandboxSettings(
                **{"port": 0, "tls": TlsSettings(tls_dir), "poll_delay_ms": 10, **overrides}
            )
            running = await stack.enter_async_context(
                serve(settings, signer=key or signer, clock=clock)
            )
            assert running.tls is not None or settings.tls is None
            connector = aiohttp.TCPConnector(
                ssl=running.tls.client_context() if running.tls is not None else False
            )
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            return SandboxClient(session, running)

        yield start


@pytest.fixture
async def client(start_sandbox: StartSandbox) -> SandboxClient:
    return await start_sandbox()


@pytest.fixture
async def token(client: SandboxClient) -> str:
    return await client.token()
