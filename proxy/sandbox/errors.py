"""The simulator's answers other than success, one class per HTTP status.

A ``code`` becomes MobilePay's error body ``{"code", "message",
"correlationId"}``; ``None`` means an empty body, as MobilePay sends with
401 and most 404s.
"""

from __future__ import annotations

from typing import ClassVar


class ApiError(Exception):
    status: ClassVar[int] = 400

    def __init__(self, code: str | None = None, message: str = "") -> None:
        super().__init__(message or code or self.__class__.__name__)
        self.code = code
        self.message = message


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    """Always sent with an empty body; the message is only logged."""

    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class UnsupportedMediaType(ApiError):
    status = 415


class InternalError(ApiError):
    status = 500


class OAuthError(Exception):
    """A token service refusal, answered as ``{"error": ...}`` like IdentityServer does."""

    def __init__(self, status: int, error: str, reason: str = "") -> None:
        super().__init__(reason or error)
        self.status = status
        self.error = error
