"""``mobilepay-proxy demo``: one whole payment through the proxy.

The demo plays a terminal that holds no MobilePay credentials: its requests
to the proxy carry only the routing header, the client system version,
idempotency keys and JSON bodies. The customer's phone is played by calls
straight to the simulator's user simulation, over TLS trusting its CA. Every
step prints one line; the first failure stops the run with a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

CLIENT_SYSTEM_VERSION = "1.0.0"
METRIC_PREFIXES = (
    "mobilepay_proxy_token_refreshes_total",
    "mobilepay_proxy_requests_total",
    "mobilepay_proxy_request_duration_seconds_count",
    "mobilepay_proxy_request_duration_seconds_sum",
)
# MobilePay's advice: retry network errors and 5xx with the same key, twice.
RETRIES = 2


class DemoFailed(Exception):
    """A step did not get the answer a payment needs; the message says which."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    proxy: URL
    merchant: str
    sandbox: URL
    ca_file: Path | None
    metrics: URL | None
    merchant_header: str = "X-Merchant-Id"
    phone_number: str = "+4520031801"
    amount: Decimal = Decimal("12.50")
    currency: str = "DKK"
    min_poll_interval: float = 1.0
    poll_timeout: float = 30.0
    request_timeout: float = 5.0
    brand_id: str | None = None
    location_id: str | None = None


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _short(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= 300 else text[:297] + "..."


class _Demo:
    def __init__(self, session: aiohttp.ClientSession, options: DemoOptions) -> None:
        self._session = session
        self._options = options
        self._phone_ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(options.ca_file))
            if options.ca_file is not None
            else True
        )
        self._step = 0

    def _say(self, label: str, method: str, path: str, status: int, details: str) -> None:
        _write(f"{self._step:>2}. {label:<26} {method:<6} {path} -> {status}  {details}".rstrip())

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> tuple[int, Any]:
        for attempt in range(RETRIES + 1):
            try:
                async with self._session.request(
                    method, url, headers=headers, json=body, ssl=ssl_context
                ) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if attempt == RETRIES:
                    raise DemoFailed(f"{method} {url} failed: {problem}") from exc
            else:
                if status < 500 or attempt == RETRIES:
                    return status, self._decode(raw)
                problem = f"status {status}: {_short(self._decode(raw))}"
            _write(f"    retrying {method} {url.path} ({problem})")
            await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    def _decode(raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    async def terminal(
        self,
        label: str,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        idempotent: bool = False,
        describe: Callable[[Any], str] = lambda answer: "",
    ) -> Any:
        """A call a terminal makes through the proxy; anything but 200 fails the demo."""
        self._step += 1
        headers = {
            self._options.merchant_header: self._options.merchant,
            "X-MobilePay-Client-System-Version": CLIENT_SYSTEM_VERSION,
        }
        if idempotent:
            headers["X-MobilePay-Idempotency-Key"] = str(uuid.uuid4())
        url = self._options.proxy.with_path(path)
        if query:
            url = url.with_query(query)
        status, answer = await self._send(method, url, headers=headers, body=body)
        if status != 200:
            self._say(label, method, url.path_qs, status, _short(answer))
            raise DemoFailed(f"{label}: the proxy answered {status}: {_short(answer)}")
        try:
            details = describe(answer)
        except (AttributeError, KeyError, TypeError, IndexError) as exc:
            self._say(label, method, url.path_qs, status, _short(answer))
            raise DemoFailed(f"{label}: unexpected answer {_short(answer)}") from exc
        self._say(label, method, url.path_qs, status, details)
        return answer

    async def phone(self, label: str, action: str, body: Mapping[str, Any]) -> None:
        """The customer's phone talking to MobilePay directly."""
        self._step += 1
        url = self._options.sandbox.with_path(f"/pos/app/usersimulation/{action}")
        status, answer = await self._send(
            "POST", url, headers={}, body=body, ssl_context=self._phone_ssl
        )
        self._say(
            label, "POST", f"{url.origin()}{url.path}", status, f"phone {body['phoneNumber']}"
        )
        if status != 200:
            raise DemoFailed(f"{label}: the simulator answered {status}: {_short(answer)}")

    async def poll_until(self, payment_id: str, wanted: str) -> Any:
        path = f"/pos/v10/payments/{payment_id}"
        deadline = time.monotonic() + self._options.poll_timeout
        while True:
            payment = await self.terminal(
                f"poll until {wanted}",
                "GET",
                path,
                describe=lambda p: f"status={p['status']} pollDelayInMs={p['pollDelayInMs']}",
            )
            status = payment["status"]
            if status == wanted:
                return payment
            if status not in ("Initiated", "Paired", "IssuedToUser", "Reserved"):
                raise DemoFailed(f"payment ended as {status} while waiting for {wanted}")
            if time.monotonic() >= deadline:
                raise DemoFailed(f"payment still {status} after {self._options.poll_timeout} s")
            delay = max(payment["pollDelayInMs"] / 1000, self._options.min_poll_interval)
            await asyncio.sleep(delay)

    async def find_store(self) -> str:
        options = self._options
        brand_id, location_id = options.brand_id, options.location_id
        if brand_id is None or location_id is None:
            stores = await self.terminal(
                "list stores",
                "GET",
                "/pos/v10/stores/detailed",
                describe=lambda stores: f"{len(stores)} stores; first {stores[0]['storeName']!r}",
            )
            brand_id, location_id = stores[0]["merchantBrandId"], stores[0]["merchantLocationId"]
        query = {"merchantBrandId": brand_id, "merchantLocationId": location_id}
        found = await self.terminal(
            "look up store",
            "GET",
            "/pos/v10/stores",
            query=query,
            describe=lambda found: f"storeIds={found['storeIds']}",
        )
        if len(found["storeIds"]) != 1:
            raise DemoFailed(f"expected one store for {query}, got {found['storeIds']}")
        return str(found["storeIds"][0])

    async def run(self) -> None:
        options = self._options
        _write(
            f"demo: terminal -> proxy {options.proxy} as {options.merchant_header}: "
            f"{options.merchant}; phone -> simulator {options.sandbox}"
        )
        store_id = await self.find_store()
        beacon_id = str(uuid.uuid4())
        created = await self.terminal(
            "create point of sale",
            "POST",
            "/pos/v10/pointofsales",
            body={
                "merchantPosId": f"demo-{uuid.uuid4().hex[:12]}",
                "storeId": store_id,
                "name": "Demo terminal",
                "beaconId": beacon_id,
                "supportedBeaconTypes": ["QR"],
                "requirePaymentBeforeCheckin": False,
            },
            idempotent=True,
            describe=lambda created: f"posId={created['posId']} beaconId={beacon_id}",
        )
        pos_id = created["posId"]
        try:
            await self._pay_and_refund(pos_id, beacon_id)
        except DemoFailed:
            await self._cleanup(f"/pos/v10/pointofsales/{pos_id}", "DELETE")
            raise
        await self.terminal("delete point of sale", "DELETE", f"/pos/v10/pointofsales/{pos_id}")
        await self._show_metrics()

    async def _pay_and_refund(self, pos_id: str, beacon_id: str) -> None:
        options = self._options
        amount = float(options.amount)
        initiated = await self.terminal(
            "initiate payment",
            "POST",
            "/pos/v10/payments",
            body={
                "posId": pos_id,
                "orderId": f"demo-{uuid.uuid4().hex[:12]}",
                "amount": amount,
                "currencyCode": options.currency,
                "merchantPaymentLabel": "demo",
                "plannedCaptureDelay": "None",
            },
            idempotent=True,
            describe=lambda p: f"paymentId={p['paymentId']} amount={amount} {options.currency}",
        )
        payment_id = initiated["paymentId"]
        phone = {"beaconId": beacon_id, "phoneNumber": options.phone_number}
        try:
            await self.phone("user checks in", "checkin", phone)
            await self.poll_until(payment_id, "IssuedToUser")
            await self.phone("user accepts", "acceptpayment", phone)
            await self.poll_until(payment_id, "Reserved")
        except DemoFailed:
            await self._cleanup(f"/pos/v10/payments/{payment_id}/cancel", "POST")
            raise

        await self.terminal(
            "capture payment",
            "POST",
            f"/pos/v10/payments/{payment_id}/capture",
            body={"amount": amount},
            describe=lambda _: f"captured {amount} {options.currency}",
        )
        refund = await self.terminal(
            "create refund",
            "POST",
            "/pos/v10/refunds",
            body={
                "paymentId": payment_id,
                "refundOrderId": f"refund-{uuid.uuid4().hex[:12]}",
                "amount": amount,
                "currencyCode": options.currency,
            },
            idempotent=True,
            describe=lambda r: f"refundId={r['refundId']}",
        )
        refund_path = f"/pos/v10/refunds/{refund['refundId']}"
        await self.terminal("capture refund", "POST", f"{refund_path}/capture")
        state = await self.terminal(
            "query refund",
            "GET",
            refund_path,
            describe=lambda r: f"status={r['status']} amount={r['amount']}",
        )
        if state["status"] != "Captured":
            raise DemoFailed(f"refund is {state['status']}, expected Captured")

    async def _cleanup(self, path: str, method: str) -> None:
        try:
            await self.terminal("cleanup", method, path)
        except DemoFailed as exc:
            _write(f"    cleanup failed: {exc}")

    async def _show_metrics(self) -> None:
        url = self._options.metrics
        if url is None:
            return
        self._step += 1
        status, text = await self._send("GET", url, headers={}, body=None)
        self._say("proxy metrics", "GET", str(url), status, "")
        if status != 200 or not isinstance(text, str):
            raise DemoFailed(f"metrics: {url} answered {status}")
        lines = [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]
        for line in lines:
            _write(f"    {line}")
        if not lines:
            _write("    (none of the expected mobilepay_proxy_* metrics were found)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilepay-proxy demo",
        description="Run one payment, capture and refund through the proxy.",
    )
    parser.add_argument("--proxy", type=URL, default=URL("http://127.0.0.1:8080"))
    parser.add_argument(
        "--merchant", default="demo-store-1", help="routing header value (default %(default)s)"
    )
    parser.add_argument(
        "--merchant-header", default="X-Merchant-Id", help="routing header (default %(default)s)"
    )
    parser.add_argument(
        "--sandbox",
        type=URL,
        default=URL("https://127.0.0.1:8443"),
        help="the simulator, for the customer's phone (default %(default)s)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=Path(".sandbox/ca.pem"),
        help="CA the simulator's certificate is issued by (default %(default)s)",
    )
    parser.add_argument(
        "--metrics",
        default="http://127.0.0.1:9180/metrics",
        help="the proxy's metrics URL; empty to skip (default %(default)s)",
    )
    parser.add_argument("--phone", default="+4520031801", help="sandbox test user")
    parser.add_argument("--amount", default="12.50")
    parser.add_argument("--currency", default="DKK", choices=["DKK", "EUR"])
    parser.add_argument("--brand-id", default=None, help="merchantBrandId of the store to use")
    parser.add_argument(
        "--location-id", default=None, help="merchantLocationId of the store to use"
    )
    parser.add_argument(
        "--min-poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="never poll faster than this, whatever pollDelayInMs says (default %(default)s)",
    )
    parser.add_argument("--poll-timeout", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--request-timeout", type=float, default=5.0, metavar="SECONDS")
    return parser


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    try:
        amount = Decimal(args.amount)
    except InvalidOperation as exc:
        raise ValueError(f"--amount {args.amount!r} is not a number") from exc
    ca_file = args.ca_file if URL(args.sandbox).scheme == "https" else None
    return DemoOptions(
        proxy=args.proxy,
        merchant=args.merchant,
        merchant_header=args.merchant_header,
        sandbox=args.sandbox,
        ca_file=ca_file,
        metrics=URL(args.metrics) if args.metrics else None,
        phone_number=args.phone,
        amount=amount,
        currency=args.currency,
        brand_id=args.brand_id,
        location_id=args.location_id,
        min_poll_interval=args.min_poll_interval,
        poll_timeout=args.poll_timeout,
        request_timeout=args.request_timeout,
    )


async def run_demo(options: DemoOptions) -> None:
    """Raises DemoFailed at the first step that goes wrong."""
    if options.ca_file is not None and not options.ca_file.is_file():
        raise DemoFailed(f"CA file {options.ca_file} not found; is the simulator running?")
    timeout = aiohttp.ClientTimeout(total=options.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _Demo(session, options).run()


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(run_demo(options))
    except DemoFailed as exc:
        sys.stderr.write(f"demo failed: {exc}\n")
        return 1
    _write("demo finished: payment reserved, captured and refunded")
    return 0
