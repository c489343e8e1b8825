"""Where tokens are kept: in memory per process, and the types a shared store exchanges."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from proxy.tokens.token import Token


class TokenStore(Protocol):
    def get(self, vat: str) -> Token | None: ...

    def put(self, token: Token) -> None: ...

    def discard(self, vat: str, generation: int | None = None) -> None:
        """Forget the merchant's token, or only the given generation of it."""

    def __iter__(self) -> Iterator[Token]: ...


class MemoryTokenStore:
    """Tokens in a dict, keyed by merchant VAT."""

    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    def get(self, vat: str) -> Token | None:
        return self._tokens.get(vat)

    def put(self, token: Token) -> None:
        self._tokens[token.vat] = token

    def discard(self, vat: str, generation: int | None = None) -> None:
        token = self._tokens.get(vat)
        if token is not None and (generation is None or token.generation == generation):
            del self._tokens[vat]

    def __iter__(self) -> Iterator[Token]:
        return iter(list(self._tokens.values()))


class StoreUnavailable(Exception):
    """Redis did not answer, or answered nonsense; the caller carries on without it."""


@dataclass(frozen=True, slots=True)
class SharedToken:
    """A token as every copy sees it; times are wall-clock, since copies share no clock."""

    value: str = field(repr=False)
    generation: int
    refresh_at: float
    expires_at: float
