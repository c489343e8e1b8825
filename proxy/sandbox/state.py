"""Stores, points of sale, payments and refunds of the simulated PoS V10 API.

Pure logic: no I/O and no aiohttp, and time comes from an injected clock.
Every operation names the merchant VAT the caller acts for; a resource
belongs to the merchant whose token created it, and another merchant gets
the 403 code the error table lists for that endpoint. Status and error codes
follow ``pos-api-errors.mdx``; where the table is silent (an invalid enum
value, say) the answer is 400 with the catch-all code 1099.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from .errors import BadRequest, Conflict, Forbidden, NotFound

Json = dict[str, Any]

VAT_PATTERN = re.compile(r"(DK|FI)\d{8}")
# The documented "valid character set" for ids and labels, at most 36 long.
_TEXT_PATTERN = re.compile(r"[\w .,:;+\-*/#&!?@'()]{1,36}")
_BEACON_PATTERN = re.compile(
    r"\d{15}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_STORE_NAMESPACE = uuid.UUID("5b0b5e2c-5d1e-4c34-9a40-4d0c1b6f0a10")
MAX_IDEMPOTENCY_KEY_LENGTH = 36
CURRENCIES = frozenset({"DKK", "EUR"})
BEACON_TYPES = frozenset({"QR", "NFC", "Bluetooth"})
CAPTURE_DELAYS = frozenset({"None", "LessThan24Hours", "LessThan14Days"})


class PaymentStatus(StrEnum):
    PREPARED = "Prepared"
    INITIATED = "Initiated"
    PAIRED = "Paired"
    ISSUED_TO_USER = "IssuedToUser"
    RESERVED = "Reserved"
    CANCELLED_BY_USER = "CancelledByUser"
    CANCELLED_BY_CLIENT = "CancelledByClient"
    CANCELLED_BY_MOBILEPAY = "CancelledByMobilePay"
    EXPIRED_AND_CANCELLED = "ExpiredAndCancelled"
    CAPTURED = "Captured"


# A second payment on a point of sale with one of these is refused (1301).
ACTIVE_PAYMENT_STATUSES = frozenset(
    {
        PaymentStatus.PREPARED,
        PaymentStatus.INITIATED,
        PaymentStatus.PAIRED,
        PaymentStatus.ISSUED_TO_USER,
    }
)
# What the user can still accept or reject in the app.
_ISSUABLE_STATUSES = frozenset(
    {PaymentStatus.INITIATED, PaymentStatus.PAIRED, PaymentStatus.ISSUED_TO_USER}
)


class RefundStatus(StrEnum):
    INITIATED = "Initiated"
    RESERVED = "Reserved"
    CAPTURED = "Captured"
    CANCELLED_BY_CLIENT = "CancelledByClient"
    CANCELLED_BY_MOBILEPAY = "CancelledByMobilePay"
    EXPIRED_AND_CAPTURED = "ExpiredAndCaptured"


# Refunds in these states hold part of the captured amount.
_REFUND_HOLDING_STATUSES = frozenset(
    {
        RefundStatus.INITIATED,
        RefundStatus.RESERVED,
        RefundStatus.CAPTURED,
        RefundStatus.EXPIRED_AND_CAPTURED,
    }
)


class UserKind(StrEnum):
    CREDIT = "credit"
    DEBIT = "debit"
    STOREBOX = "storebox"
    LOYALTY = "loyalty"
    PARTIAL_CAPTURE = "partial_capture"


@dataclass(frozen=True, slots=True)
class SandboxUser:
    """One of MobilePay's sandbox phone numbers and what it stands for."""

    phone_number: str
    kind: UserKind

    @property
    def customer_token(self) -> str:
        return hashlib.sha1(f"customer:{self.phone_number}".encode()).hexdigest()

    @property
    def customer_receipt_token(self) -> str:
        if self.kind is not UserKind.STOREBOX:
            return ""
        return hashlib.md5(f"receipt:{self.phone_number}".encode()).hexdigest()

    @property
    def loyalty_ids(self) -> list[str]:
        return ["123456"] if self.kind is UserKind.LOYALTY else []


def _sandbox_users() -> dict[str, SandboxUser]:
    # DK +4520031801..805 and FI +358200318001..005, in the documented order
    # credit, debit, Storebox, loyalty, partial capture.
    users = {}
    for prefix in ("+452003180", "+35820031800"):
        for number, kind in enumerate(UserKind, start=1):
            users[f"{prefix}{number}"] = SandboxUser(f"{prefix}{number}", kind)
    return users


SANDBOX_USERS: Mapping[str, SandboxUser] = _sandbox_users()


@dataclass(slots=True)
class Store:
    store_id: str
    merchant_vat: str
    name: str
    street: str
    zip_code: str
    city: str
    brand_name: str
    merchant_brand_id: str
    merchant_location_id: str

    def to_json(self) -> Json:
        return {
            "storeName": self.name,
            "storeId": self.store_id,
            "storeStreet": self.street,
            "storeZipCode": self.zip_code,
            "storeCity": self.city,
            "brandName": self.brand_name,
            "merchantBrandId": self.merchant_brand_id,
            "merchantLocationId": self.merchant_location_id,
        }


_SEED_STORES: Mapping[str, tuple[tuple[str, str, str, str], ...]] = {
    "DK": (
        ("Demo Store Copenhagen", "Vesterbrogade 1", "1620", "København V"),
        ("Demo Store Aarhus", "Søndergade 10", "8000", "Aarhus C"),
        ("Demo Store Odense", "Vestergade 20", "5000", "Odense C"),
    ),
    "FI": (
        ("Demo Store Helsinki", "Keskuskatu 4", "00100", "Helsinki"),
        ("Demo Store Tampere", "Hämeenkatu 10", "33100", "Tampere"),
        ("Demo Store Turku", "Yliopistonkatu 20", "20100", "Turku"),
    ),
}


@dataclass(slots=True)
class PointOfSale:
    pos_id: str
    merchant_vat: str
    merchant_pos_id: str
    store_id: str
    name: str
    beacon_id: str
    callback_alias: str | None
    supported_beacon_types: list[str]
    require_payment_before_checkin: bool
    checked_in: SandboxUser | None = None

    def to_json(self) -> Json:
        return {
            "posId": self.pos_id,
            "merchantPosId": self.merchant_pos_id,
            "storeId": self.store_id,
            "name": self.name,
            "beaconId": self.beacon_id,
            "callbackAlias": self.callback_alias,
            "supportedBeaconTypes": list(self.supported_beacon_types),
            "requirePaymentBeforeCheckin": self.require_payment_before_checkin,
        }


@dataclass(slots=True)
class Payment:
    payment_id: str
    merchant_vat: str
    pos_id: str
    order_id: str
    status: PaymentStatus
    expires_at: float
    amount: Decimal | None = None
    currency_code: str | None = None
    restrictions: Json | None = None
    merchant_payment_label: str | None = None
    planned_capture_delay: str | None = None
    user: SandboxUser | None = None
    captured_amount: Decimal | None = None

    @property
    def partial_capture_possible(self) -> bool:
        return self.user is not None and self.user.kind is UserKind.PARTIAL_CAPTURE


@dataclass(slots=True)
class Refund:
    refund_id: str
    merchant_vat: str
    payment_id: str
    refund_order_id: str
    amount: Decimal
    currency_code: str
    status: RefundStatus

    def to_json(self, poll_delay_ms: int) -> Json:
        return {
            "refundId": self.refund_id,
            "paymentId": self.payment_id,
            "refundOrderId": self.refund_order_id,
            "amount": float(self.amount),
            "currencyCode": self.currency_code,
            "status": str(self.status),
            "pollDelayInMs": poll_delay_ms,
        }


@dataclass(frozen=True, slots=True)
class _Recorded:
    fingerprint: str
    body: Json


def fingerprint(method: str, path: str, body: Mapping[str, Any]) -> str:
    """What two requests must share for one to count as a retry of the other."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return f"{method} {path} {canonical}"


def parse_idempotency_key(values: list[str]) -> str:
    if not values:
        raise BadRequest("1164", "Missing x-mobilepay-idempotency-key header")
    if len(values) > 1:
        raise BadRequest("1163", "Duplicated x-mobilepay-idempotency-key header")
    key = values[0]
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequest(
            "1162",
            f"x-mobilepay-idempotency-key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
        )
    return key


def _text(body: Mapping[str, Any], name: str, code: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not _TEXT_PATTERN.fullmatch(value):
        raise BadRequest(code, f"Invalid {name[0].upper()}{name[1:]}")
    return value


def _optional_text(body: Mapping[str, Any], name: str, code: str) -> str | None:
    return None if body.get(name) is None else _text(body, name, code)


def _amount(body: Mapping[str, Any]) -> Decimal:
    value = body.get("amount")
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise BadRequest("1102", "Invalid Amount")
    amount = Decimal(value)
    exponent = amount.as_tuple().exponent
    if not amount.is_finite() or amount <= 0 or not isinstance(exponent, int) or exponent < -2:
        raise BadRequest("1102", "Invalid Amount: positive, with at most two decimals")
    return amount


def parse_uuid(value: Any, name: str) -> str:
    """``value`` as a canonical lower-case GUID, or 400 1099."""
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise BadRequest("1099", f"Invalid {name}")


def _enum(body: Mapping[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = body.get(name)
    if not isinstance(value, str) or value not in allowed:
        raise BadRequest("1099", f"Invalid {name}: one of {', '.join(sorted(allowed))}")
    return value


def _restrictions(body: Mapping[str, Any]) -> Json | None:
    value = body.get("restrictions")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        key in {"debitCardDisallowed", "creditCardDisallowed"}
        and (flag is None or isinstance(flag, bool))
        for key, flag in value.items()
    ):
        raise BadRequest("1099", "Invalid restrictions")
    return {
        "debitCardDisallowed": value.get("debitCardDisallowed", False),
        "creditCardDisallowed": value.get("creditCardDisallowed", False),
    }


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


@dataclass(frozen=True, slots=True)
class _PaymentDetails:
    """What initiating or readying a payment adds to it, checked before anything changes."""

    amount: Decimal
    currency_code: str
    planned_capture_delay: str
    restrictions: Json | None
    merchant_payment_label: str | None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> _PaymentDetails:
        return cls(
            amount=_amount(body),
            currency_code=_enum(body, "currencyCode", CURRENCIES),
            planned_capture_delay=_enum(body, "plannedCaptureDelay", CAPTURE_DELAYS),
            restrictions=_restrictions(body),
            merchant_payment_label=_optional_text(body, "merchantPaymentLabel", "1117"),
        )

    def apply(self, payment: Payment, pos: PointOfSale) -> None:
        payment.amount = self.amount
        payment.currency_code = self.currency_code
        payment.planned_capture_delay = self.planned_capture_delay
        payment.restrictions = self.restrictions
        payment.merchant_payment_label = self.merchant_payment_label
        if pos.checked_in is not None:
            payment.user = pos.checked_in
            payment.status = PaymentStatus.PAIRED
        else:
            payment.status = PaymentStatus.INITIATED


@dataclass(slots=True)
class PosState:
    """Everything the simulated PoS API knows, in memory."""

    clock: Callable[[], float]
    poll_delay_ms: int = 1000
    payment_expiry_seconds: int = 300
    stores: dict[str, Store] = field(default_factory=dict)
    points_of_sale: dict[str, PointOfSale] = field(default_factory=dict)
    payments: dict[str, Payment] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    _seeded: set[str] = field(default_factory=set)
    _idempotency: dict[tuple[str, str], _Recorded] = field(default_factory=dict)

    # -- idempotency -------------------------------------------------------

    def idempotent(
        self, merchant_vat: str, key: str, request_fingerprint: str, create: Callable[[], Json]
    ) -> Json:
        """Run ``create`` once per key; a retry with the same request gets the first answer.

        Only successes are remembered, so a retry after a refusal is tried afresh.
        """
        recorded = self._idempotency.get((merchant_vat, key))
        if recorded is not None:
            if recorded.fingerprint != request_fingerprint:
                raise Conflict(
                    "1306",
                    "x-mobilepay-idempotency-key header has to be unique per request "
                    "unless the request is a retry of a previous request",
                )
            return recorded.body
        body = create()
        self._idempotency[(merchant_vat, key)] = _Recorded(request_fingerprint, body)
        return body

    # -- stores ------------------------------------------------------------

    def _seed(self, merchant_vat: str) -> list[Store]:
        if merchant_vat not in self._seeded:
            self._seeded.add(merchant_vat)
            for number, (name, street, zip_code, city) in enumerate(
                _SEED_STORES[merchant_vat[:2]], start=1
            ):
                location = f"1000{number}"
                store = Store(
                    store_id=str(uuid.uuid5(_STORE_NAMESPACE, f"{merchant_vat}/{location}")),
                    merchant_vat=merchant_vat,
                    name=name,
                    street=street,
                    zip_code=zip_code,
                    city=city,
                    brand_name=f"Demo Brand {merchant_vat}",
                    merchant_brand_id=f"POS{merchant_vat}",
                    merchant_location_id=location,
                )
                self.stores[store.store_id] = store
        return [store for store in self.stores.values() if store.merchant_vat == merchant_vat]

    def get_store(self, merchant_vat: str, store_id: str) -> Json:
        self._seed(merchant_vat)
        store = self.stores.get(store_id)
        # The table lists no 403 for stores: another merchant's store is not found.
        if store is None or store.merchant_vat != merchant_vat:
            raise NotFound
        return store.to_json()

    def _filter_stores(
        self, merchant_vat: str, brand_id: str | None, location_id: str | None
    ) -> list[Store]:
        if brand_id is not None and not _TEXT_PATTERN.fullmatch(brand_id):
            raise BadRequest("1119", "Invalid MerchantBrandId")
        if location_id is not None and not _TEXT_PATTERN.fullmatch(location_id):
            raise BadRequest("1120", "Invalid MerchantLocationId")
        return [
            store
            for store in self._seed(merchant_vat)
            if brand_id in (None, store.merchant_brand_id)
            and location_id in (None, store.merchant_location_id)
        ]

    def find_stores(self, merchant_vat: str, brand_id: str | None, location_id: str | None) -> Json:
        if brand_id is None and location_id is None:
            raise BadRequest("1122", "Store filter not specific enough")
        stores = self._filter_stores(merchant_vat, brand_id, location_id)
        return {"storeIds": [store.store_id for store in stores]}

    def detailed_stores(
        self, merchant_vat: str, brand_id: str | None, location_id: str | None
    ) -> list[Json]:
        return [
            store.to_json() for store in self._filter_stores(merchant_vat, brand_id, location_id)
        ]

    # -- points of sale ----------------------------------------------------

    def _pos(self, merchant_vat: str, pos_id: str, forbidden_code: str) -> PointOfSale:
        pos = self.points_of_sale.get(pos_id)
        if pos is None:
            raise NotFound
        if pos.merchant_vat != merchant_vat:
            raise Forbidden(forbidden_code, "The point of sale belongs to a different merchant")
        return pos

    def create_pos(self, merchant_vat: str, body: Mapping[str, Any]) -> Json:
        merchant_pos_id = _text(body, "merchantPosId", "1111")
        name = _text(body, "name", "1112")
        store_id = parse_uuid(body.get("storeId"), "storeId")
        beacon_id = body.get("beaconId")
        if beacon_id is not None and (
            not isinstance(beacon_id, str) or not _BEACON_PATTERN.fullmatch(beacon_id)
        ):
            raise BadRequest("1100", "Invalid BeaconId: a 15-digit number or a GUID")
        callback_alias = _optional_text(body, "callbackAlias", "1116")
        beacon_types = body.get("supportedBeaconTypes")
        if (
            not isinstance(beacon_types, list)
            or not beacon_types
            or not all(isinstance(kind, str) and kind in BEACON_TYPES for kind in beacon_types)
            or len(set(beacon_types)) != len(beacon_types)
        ):
            raise BadRequest(
                "1099", "Invalid supportedBeaconTypes: distinct values of QR, NFC, Bluetooth"
            )
        require_payment = body.get("requirePaymentBeforeCheckin", False)
        if not isinstance(require_payment, bool):
            raise BadRequest("1099", "Invalid requirePaymentBeforeCheckin")

        self._seed(merchant_vat)
        store = self.stores.get(store_id)
        if store is None:
            raise Conflict("1002", "Store not found")
        if store.merchant_vat != merchant_vat:
            raise Forbidden(
                "1403", "Cannot create point of sale on store that does not belong to the merchant"
            )
        for existing in self.points_of_sale.values():
            same_merchant = existing.merchant_vat == merchant_vat
            if same_merchant and existing.merchant_pos_id == merchant_pos_id:
                raise Conflict("1200", "A point of sale with that MerchantPosId already exist")
            if beacon_id is not None and existing.beacon_id.lower() == beacon_id.lower():
                raise Conflict("1202", "A point of sale with that BeaconId already exist")
        pos = PointOfSale(
            pos_id=str(uuid.uuid4()),
            merchant_vat=merchant_vat,
            merchant_pos_id=merchant_pos_id,
            store_id=store_id,
            name=name,
            beacon_id=beacon_id if beacon_id is not None else self._new_beacon_id(),
            callback_alias=callback_alias,
            supported_beacon_types=list(beacon_types),
            require_payment_before_checkin=require_payment,
        )
        self.points_of_sale[pos.pos_id] = pos
        return {"posId": pos.pos_id}

    def _new_beacon_id(self) -> str:
        taken = {pos.beacon_id for pos in self.points_of_sale.values()}
        while True:
            candidate = f"{uuid.uuid4().int % 10**15:015d}"
            if candidate not in taken:
                return candidate

    def get_pos(self, merchant_vat: str, pos_id: str) -> Json:
        return self._pos(merchant_vat, pos_id, "1410").to_json()

    def find_pos(
        self,
        merchant_vat: str,
        store_id: str | None,
        beacon_id: str | None,
        merchant_pos_id: str | None,
    ) -> Json:
        if store_id is None and beacon_id is None and merchant_pos_id is None:
            raise BadRequest("1121", "Point of sale filter not specific enough")
        return {
            "posIds": [
                pos.pos_id
                for pos in self.points_of_sale.values()
                if pos.merchant_vat == merchant_vat
                and store_id in (None, pos.store_id)
                and beacon_id in (None, pos.beacon_id)
                and merchant_pos_id in (None, pos.merchant_pos_id)
            ]
        }

    def delete_pos(self, merchant_vat: str, pos_id: str) -> None:
        pos = self._pos(merchant_vat, pos_id, "1409")
        for payment in self._payments_on(pos.pos_id):
            if payment.status in ACTIVE_PAYMENT_STATUSES:
                payment.status = PaymentStatus.CANCELLED_BY_MOBILEPAY
        del self.points_of_sale[pos.pos_id]

    def get_checkin(self, merchant_vat: str, pos_id: str) -> Json:
        pos = self._pos(merchant_vat, pos_id, "1400")
        body: Json = {"isUserCheckedIn": pos.checked_in is not None}
        if pos.checked_in is not None:
            body["loyaltyIds"] = pos.checked_in.loyalty_ids
            body["customerToken"] = pos.checked_in.customer_token
            body["customerReceiptToken"] = pos.checked_in.customer_receipt_token
        body["pollDelayInMs"] = self.poll_delay_ms
        return body

    # -- payments ----------------------------------------------------------

    def _payments_on(self, pos_id: str) -> list[Payment]:
        now = self.clock()
        payments = [p for p in self.payments.values() if p.pos_id == pos_id]
        for payment in payments:
            self._expire(payment, now)
        return payments

    def _expire(self, payment: Payment, now: float) -> None:
        if payment.status in ACTIVE_PAYMENT_STATUSES and now >= payment.expires_at:
            payment.status = PaymentStatus.EXPIRED_AND_CANCELLED
            self._check_out(payment)

    def _check_out(self, payment: Payment) -> None:
        pos = self.points_of_sale.get(payment.pos_id)
        if pos is not None:
            pos.checked_in = None

    def _payment(self, merchant_vat: str, payment_id: str, forbidden_code: str) -> Payment:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise NotFound
        if payment.merchant_vat != merchant_vat:
            raise Forbidden(forbidden_code, "The payment belongs to a different merchant")
        self._expire(payment, self.clock())
        return payment

    def _start_payment(self, merchant_vat: str, pos_id: str) -> PointOfSale:
        pos = self.points_of_sale.get(pos_id)
        if pos is None:
            raise Conflict("1000", "Point of Sale not found")
        if pos.merchant_vat != merchant_vat:
            raise Forbidden("1400", "The point of sale belongs to a different merchant")
        if any(p.status in ACTIVE_PAYMENT_STATUSES for p in self._payments_on(pos_id)):
            raise Conflict(
                "1301", "A payment is already active. Cancel it before starting a new one"
            )
        return pos

    def initiate_payment(self, merchant_vat: str, body: Mapping[str, Any]) -> Json:
        return self._new_payment(merchant_vat, body, PaymentStatus.INITIATED)

    def prepare_payment(self, merchant_vat: str, body: Mapping[str, Any]) -> Json:
        return self._new_payment(merchant_vat, body, PaymentStatus.PREPARED)

    def _new_payment(
        self, merchant_vat: str, body: Mapping[str, Any], status: PaymentStatus
    ) -> Json:
        """A payment on a free point of sale; amounts are given now (initiate) or later."""
        pos_id = parse_uuid(body.get("posId"), "posId")
        order_id = _text(body, "orderId", "1113")
        details = _PaymentDetails.parse(body) if status is PaymentStatus.INITIATED else None
        pos = self._start_payment(merchant_vat, pos_id)
        payment = Payment(
            payment_id=str(uuid.uuid4()),
            merchant_vat=merchant_vat,
            pos_id=pos.pos_id,
            order_id=order_id,
            status=status,
            expires_at=self.clock() + self.payment_expiry_seconds,
        )
        if details is not None:
            details.apply(payment, pos)
        self.payments[payment.payment_id] = payment
        return {"paymentId": payment.payment_id}

    def ready_payment(self, merchant_vat: str, payment_id: str, body: Mapping[str, Any]) -> None:
        payment = self._payment(merchant_vat, payment_id, "1406")
        details = _PaymentDetails.parse(body)
        if payment.status is not PaymentStatus.PREPARED:
            raise Conflict("1303", "Payment needs to be prepared before it can be marked as ready")
        pos = self.points_of_sale.get(payment.pos_id)
        if pos is None:
            raise Conflict("1000", "Point of sale not found")
        details.apply(payment, pos)

    def get_payment(self, merchant_vat: str, payment_id: str) -> Json:
        payment = self._payment(merchant_vat, payment_id, "1411")
        body: Json = {
            "paymentId": payment.payment_id,
            "posId": payment.pos_id,
            "orderId": payment.order_id,
            "amount": None if payment.amount is None else float(payment.amount),
            "currencyCode": payment.currency_code,
            "restrictions": payment.restrictions,
            "merchantPaymentLabel": payment.merchant_payment_label,
            "plannedCaptureDelay": payment.planned_capture_delay,
            "status": str(payment.status),
            "customerToken": None,
            "paymentExpiresAt": _iso(payment.expires_at),
            "pollDelayInMs": self.poll_delay_ms,
        }
        if payment.user is not None:
            body["customerToken"] = payment.user.customer_token
            body["customerReceiptToken"] = payment.user.customer_receipt_token
            body["loyaltyIds"] = payment.user.loyalty_ids
        if payment.status is PaymentStatus.RESERVED:
            body["partialCapturePossible"] = payment.partial_capture_possible
        # Pairing is reported once; by the next poll the app shows the payment.
        if payment.status is PaymentStatus.PAIRED:
            payment.status = PaymentStatus.ISSUED_TO_USER
        return body

    def find_payments(
        self,
        merchant_vat: str,
        pos_id: str | None,
        order_id: str | None,
        state: str | None,
    ) -> Json:
        if pos_id is None and order_id is None:
            raise BadRequest("1109", "Payment filter not specific enough")
        if state is not None and state != PaymentStatus.CAPTURED:
            raise BadRequest("1099", "Invalid state: only Captured can be asked for")
        wanted = (
            {PaymentStatus.CAPTURED}
            if state is not None
            else ACTIVE_PAYMENT_STATUSES | {PaymentStatus.RESERVED}
        )
        now = self.clock()
        matches = []
        for payment in self.payments.values():
            self._expire(payment, now)
            if (
                payment.merchant_vat == merchant_vat
                and pos_id in (None, payment.pos_id)
                and order_id in (None, payment.order_id)
                and payment.status in wanted
            ):
                matches.append(payment.payment_id)
        return {"paymentIds": matches}

    def capture_payment(self, merchant_vat: str, payment_id: str, body: Mapping[str, Any]) -> None:
        payment = self._payment(merchant_vat, payment_id, "1407")
        amount = _amount(body)
        if payment.status is PaymentStatus.CAPTURED:
            # A retried capture of the same amount is a success, not a conflict.
            if amount == payment.captured_amount:
                return
            raise Conflict("1307", "Payment has already been captured with a different amount")
        if payment.status is not PaymentStatus.RESERVED or payment.amount is None:
            raise Conflict("1304", "Cannot capture payment when payment is not reserved")
        if amount > payment.amount:
            raise Conflict("1305", "Capture Amount cannot exceed the reserved amount")
        if amount < payment.amount and not payment.partial_capture_possible:
            raise Conflict("1308", "Partial capture not possible on this payment")
        payment.status = PaymentStatus.CAPTURED
        payment.captured_amount = amount

    def cancel_payment(self, merchant_vat: str, payment_id: str) -> None:
        payment = self._payment(merchant_vat, payment_id, "1408")
        if payment.status is PaymentStatus.CANCELLED_BY_CLIENT:
            return
        if payment.status not in ACTIVE_PAYMENT_STATUSES | {PaymentStatus.RESERVED}:
            raise Conflict("1300", "The payment cannot be cancelled in the current state")
        payment.status = PaymentStatus.CANCELLED_BY_CLIENT
        self._check_out(payment)

    # -- refunds -----------------------------------------------------------

    def _refund(self, merchant_vat: str, refund_id: str, not_found_code: str | None) -> Refund:
        refund = self.refunds.get(refund_id)
        if refund is None:
            raise NotFound(not_found_code, "Refund not found" if not_found_code else "")
        if refund.merchant_vat != merchant_vat:
            raise Forbidden("1402", "The refund belongs to a different merchant")
        return refund

    def create_refund(self, merchant_vat: str, body: Mapping[str, Any]) -> Json:
        payment_id = parse_uuid(body.get("paymentId"), "paymentId")
        refund_order_id = _text(body, "refundOrderId", "1114")
        amount = _amount(body)
        currency_code = _enum(body, "currencyCode", CURRENCIES)
        payment = self.payments.get(payment_id)
        if payment is None:
            raise Conflict("1001", "Payment not found")
        if payment.merchant_vat != merchant_vat:
            raise Forbidden("1401", "The payment belongs to a different merchant")
        if payment.status is not PaymentStatus.CAPTURED or payment.captured_amount is None:
            raise Conflict("1354", "Refund of payment not possible when payment is not captured")
        if currency_code != payment.currency_code:
            raise Conflict("1365", "Refund CurrencyCode is different than payment CurrencyCode")
        refunded = sum(
            (
                refund.amount
                for refund in self.refunds.values()
                if refund.payment_id == payment_id and refund.status in _REFUND_HOLDING_STATUSES
            ),
            Decimal(0),
        )
        if refunded + amount > payment.captured_amount:
            raise Conflict("1367", "Refund Amount is too high")
        refund = Refund(
            refund_id=str(uuid.uuid4()),
            merchant_vat=merchant_vat,
            payment_id=payment_id,
            refund_order_id=refund_order_id,
            amount=amount,
            currency_code=currency_code,
            # Reservation is instant here; MobilePay passes through Initiated.
            status=RefundStatus.RESERVED,
        )
        self.refunds[refund.refund_id] = refund
        return {"refundId": refund.refund_id}

    def get_refund(self, merchant_vat: str, refund_id: str) -> Json:
        return self._refund(merchant_vat, refund_id, None).to_json(self.poll_delay_ms)

    def find_refunds(self, merchant_vat: str, payment_id: str | None) -> Json:
        if payment_id is None:
            raise BadRequest("1110", "Refund filter not specific enough")
        return {
            "refundIds": [
                refund.refund_id
                for refund in self.refunds.values()
                if refund.merchant_vat == merchant_vat and refund.payment_id == payment_id
            ]
        }

    def capture_refund(self, merchant_vat: str, refund_id: str) -> None:
        # The error table gives this 404, unlike the others, a code.
        refund = self._refund(merchant_vat, refund_id, "1004")
        if refund.status is RefundStatus.CAPTURED:
            return
        if refund.status is not RefundStatus.RESERVED:
            raise Conflict("1351", "Cannot capture refund when refund is not reserved")
        refund.status = RefundStatus.CAPTURED

    def cancel_refund(self, merchant_vat: str, refund_id: str) -> None:
        refund = self._refund(merchant_vat, refund_id, None)
        if refund.status is RefundStatus.CANCELLED_BY_CLIENT:
            return
        if refund.status is not RefundStatus.RESERVED:
            raise Conflict("1352", "The refund cannot be cancelled in the current state")
        refund.status = RefundStatus.CANCELLED_BY_CLIENT

    # -- the customer's phone ----------------------------------------------

    def _user_target(self, body: Mapping[str, Any]) -> tuple[PointOfSale, SandboxUser | None]:
        beacon_id = body.get("beaconId")
        pos = next(
            (p for p in self.points_of_sale.values() if p.beacon_id == beacon_id),
            None,
        )
        if pos is None:
            raise BadRequest("1099", "No point of sale has that beaconId")
        phone_number = body.get("phoneNumber")
        if phone_number is None:
            return pos, None
        user = SANDBOX_USERS.get(phone_number) if isinstance(phone_number, str) else None
        if user is None:
            raise BadRequest(
                "1099",
                "phoneNumber must be a sandbox test user: +4520031801..805, +358200318001..005",
            )
        return pos, user

    def _issued_payment(self, pos: PointOfSale) -> Payment | None:
        return next(
            (p for p in self._payments_on(pos.pos_id) if p.status in _ISSUABLE_STATUSES), None
        )

    def user_checkin(self, body: Mapping[str, Any]) -> None:
        pos, user = self._user_target(body)
        if user is None:
            raise BadRequest("1099", "phoneNumber is required")
        payment = self._issued_payment(pos)
        if pos.require_payment_before_checkin and payment is None:
            raise BadRequest("1099", "This point of sale needs a payment before check-in")
        pos.checked_in = user
        if payment is not None and payment.user is None:
            payment.user = user
            payment.status = PaymentStatus.PAIRED

    def user_accept_payment(self, body: Mapping[str, Any]) -> None:
        pos, user = self._user_target(body)
        if user is None:
            raise BadRequest("1099", "phoneNumber is required")
        payment = self._issued_payment(pos)
        if payment is None:
            raise BadRequest("1099", "No payment is waiting for the user on this point of sale")
        if payment.user is not None and payment.user != user:
            raise BadRequest("1099", "The payment is issued to another user")
        payment.user = user
        payment.status = PaymentStatus.RESERVED
        self._check_out(payment)

    def user_cancel_payment(self, body: Mapping[str, Any]) -> None:
        pos, user = self._user_target(body)
        payment = self._issued_payment(pos)
        if payment is None:
            raise BadRequest("1099", "No payment is waiting for the user on this point of sale")
        if user is not None and payment.user is not None and payment.user != user:
            raise BadRequest("1099", "The payment is issued to another user")
        payment.status = PaymentStatus.CANCELLED_BY_USER
        self._check_out(payment)
