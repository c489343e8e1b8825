"""Runtime knobs and counters of the simulator, read and set through ``/_sandbox/``."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .settings import FaultSettings

_INTEGER_FAULTS = frozenset(
    {"unauthorized_every", "unauthorized_next", "latency_ms", "errors_next", "token_errors_next"}
)


class Faults:
    """The misbehaviour currently injected, and the dice behind the random part."""

    def __init__(self, settings: FaultSettings, rng: random.Random) -> None:
        self.settings = settings
        self._rng = rng
        self._calls_since_set = 0

    def update(self, changes: Mapping[str, Any]) -> FaultSettings:
        """Apply a partial update; ValueError names the first bad field."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name in _INTEGER_FAULTS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} must be an integer")
            elif name == "error_rate":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError("error_rate must be a number")
                value = float(value)
            else:
                raise ValueError(f"unknown fault {name!r}")
            checked[name] = value
        self.settings = dataclasses.replace(self.settings, **checked)
        if "unauthorized_every" in checked:
            self._calls_since_set = 0
        return self.settings

    def reset(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._calls_since_set = 0

    def take_unauthorized(self) -> bool:
        """Whether this PoS call is to be refused with 401."""
        self._calls_since_set += 1
        every = self.settings.unauthorized_every
        if self.settings.unauthorized_next > 0:
            self.settings = dataclasses.replace(
                self.settings, unauthorized_next=self.settings.unauthorized_next - 1
            )
            return True
        return every > 0 and self._calls_since_set % every == 0

    def take_error(self) -> str | None:
        """An internal error code if this PoS call is to fail with 500."""
        if self.settings.errors_next > 0:
            self.settings = dataclasses.replace(
                self.settings, errors_next=self.settings.errors_next - 1
            )
            return self._error_code()
        if self.settings.error_rate > 0 and self._rng.random() < self.settings.error_rate:
            return self._error_code()
        return None

    def take_token_error(self) -> str | None:
        if self.settings.token_errors_next > 0:
            self.settings = dataclasses.replace(
                self.settings, token_errors_next=self.settings.token_errors_next - 1
            )
            return self._error_code()
        return None

    def _error_code(self) -> str:
        return str(self._rng.randint(2000, 2999))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)


@dataclass(slots=True)
class Stats:
    """What the simulator has been asked, so tests can count token fetches."""

    token_requests: int = 0
    tokens_issued: int = 0
    tokens_by_merchant_vat: Counter[str] = field(default_factory=Counter)
    pos_requests: int = 0
    pos_by_status: Counter[int] = field(default_factory=Counter)
    pos_by_merchant_vat: Counter[str] = field(default_factory=Counter)
    user_simulation_requests: int = 0
    injected_unauthorized: int = 0
    injected_errors: int = 0
    injected_token_errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "token_requests": {
                "total": self.token_requests,
                "issued": self.tokens_issued,
                "by_merchant_vat": dict(sorted(self.tokens_by_merchant_vat.items())),
            },
            "pos_requests": {
                "total": self.pos_requests,
                "by_status": {str(k): v for k, v in sorted(self.pos_by_status.items())},
                "by_merchant_vat": dict(sorted(self.pos_by_merchant_vat.items())),
            },
            "user_simulation_requests": self.user_simulation_requests,
            "injected": {
                "unauthorized": self.injected_unauthorized,
                "errors": self.injected_errors,
                "token_errors": self.injected_token_errors,
            },
        }


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request as the simulator received it, for tests of what a client sent."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    status: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": [list(pair) for pair in self.headers],
            "status": self.status,
        }


class RequestLog:
    def __init__(self, size: int) -> None:
        self._seen: deque[SeenRequest] = deque(maxlen=size)

    def add(self, seen: SeenRequest) -> None:
        self._seen.append(seen)

    def clear(self) -> None:
        self._seen.clear()

    def to_json(self) -> list[dict[str, Any]]:
        return [seen.to_json() for seen in self._seen]
