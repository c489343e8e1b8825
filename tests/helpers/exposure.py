"""The secret guard: nothing a test saw the proxy show may contain a credential or a token.

Every log record (as a text line and as every field a JSON formatter could print), the
output of every process a test starts, and the bodies, headers and metrics a test reads
are collected here and searched for the test credentials and every token issued.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field

import pytest

from tests.fakes import CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID

SECRET_VALUES = frozenset(
    {
        CLIENT_SECRET,
        IBM_CLIENT_ID,
        base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode(),
    }
)
LEAK_MESSAGE = "secrets leaked"
# Attributes every LogRecord has; anything else came in through ``extra=`` and would be
# printed by a JSON formatter.
_RECORD_ATTRIBUTES = frozenset({*vars(logging.makeLogRecord({})), "message", "asctime"})


class LogCapture(logging.Handler):
    """Keeps every record both as a text line and as its fields, as a JSON line would."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        extra = {
            name: value for name, value in vars(record).items() if name not in _RECORD_ATTRIBUTES
        }
        if extra:
            self.lines.append(repr(extra))


@dataclass(repr=False)
class Exposure:
    """Everything the proxy showed the outside world during one test."""

    logs: LogCapture = field(default_factory=LogCapture)
    texts: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    # Credentials of a test that does not use the fakes' (the simulator's, say).
    secrets: set[str] = field(default_factory=set)

    def __repr__(self) -> str:
        # Never the texts themselves: a failing test's report would show the leak again.
        return f"<Exposure of {len(self.logs.lines) + len(self.texts)} texts>"

    def leaks(self) -> list[str]:
        """Where each secret showed, the secrets themselves masked."""
        secrets = SECRET_VALUES | self.secrets | self.tokens
        found = []
        for text in [*self.logs.lines, *self.texts]:
            for secret in secrets:
                if secret in text:
                    start = max(0, text.index(secret) - 60)
                    found.append(f"{secret[:4]}... in {_masked(text, secrets)[start:][:120]!r}")
        return found

    def check(self) -> None:
        leaks = self.leaks()
        if leaks:
            pytest.fail(f"{LEAK_MESSAGE}: {leaks}", pytrace=False)


def _masked(text: str, secrets: set[str] | frozenset[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<secret>")
    return text
