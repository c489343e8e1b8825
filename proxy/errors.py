"""Errors the proxy itself answers with, each mapped to one status and one error code.

Every error leaves the proxy in the shape of MobilePay's own ``ErrorResponse``,
``{"code": code, "message": sentence, "correlationId": request id}``, so clients generated
from ``pos.yaml`` can read it, with an ``X-Proxy-Error: code`` header, so terminals and
operators can tell the proxy's answers from MobilePay's own.
"""

from __future__ import annotations

ERROR_HEADER = "X-Proxy-Error"


class ProxyError(Exception):
    """Base of the proxy's own errors; subclasses fix the status and the code."""

    status = 500
    code = "internal_error"
    default_message = "The proxy failed to handle the request."
    # True where the rest of the connection's bytes cannot be trusted or are not worth reading.
    closes_connection = False

    def __init__(self, message: str | None = None, *, retry_after: int | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        super().__init__(self.message)


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"
    default_message = "The request is malformed."


class MalformedRequest(BadRequest):
    code = "malformed_request"
    default_message = "The request is not valid HTTP/1.1."
    closes_connection = True


class IncompleteBody(BadRequest):
    code = "incomplete_body"
    default_message = "The request body ended before all of it arrived."
    closes_connection = True


class MissingRoutingHeader(BadRequest):
    code = "missing_routing_header"


class InvalidRoutingHeader(BadRequest):
    code = "invalid_routing_header"


class InvalidPath(BadRequest):
    code = "invalid_path"


class InvalidQuery(BadRequest):
    code = "invalid_query"


class AbsoluteTarget(BadRequest):
    code = "absolute_target"
    default_message = (
        "The request target must be a path (origin-form); the proxy is not a forward proxy."
    )


class UnsupportedUpgrade(BadRequest):
    code = "upgrade_not_supported"
    default_message = "Protocol upgrades are not supported."
    closes_connection = True


class UnknownMerchant(ProxyError):
    status = 403
    code = "unknown_merchant"


class SourceNotAllowed(ProxyError):
    status = 403
    code = "source_not_allowed"


class UnknownRoute(ProxyError):
    status = 404
    code = "unknown_route"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, *, allowed: str) -> None:
        super().__init__(f"The method is not allowed; use one of {allowed}.")
        self.allowed = allowed


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    default_message = "The request body did not arrive in time."
    closes_connection = True


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"
    closes_connection = True


class HeadersTooLarge(ProxyError):
    status = 431
    code = "headers_too_large"
    default_message = "The request line or a header is too long."
    closes_connection = True


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"
    default_message = "MobilePay could not be reached."


class UpstreamBadResponse(ProxyError):
    status = 502
    code = "upstream_bad_response"
    default_message = "MobilePay's response was broken or incomplete."


class UpstreamBusy(ProxyError):
    status = 503
    code = "upstream_busy"
    default_message = "Every connection to MobilePay is busy; try again shortly."

    def __init__(self, message: str | None = None, *, retry_after: int | None = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class TokenUnavailable(ProxyError):
    status = 503
    code = "token_unavailable"
    default_message = "No MobilePay access token could be obtained for this merchant."


class TooManyConnections(ProxyError):
    status = 503
    code = "too_many_connections"
    default_message = "The proxy has as many terminal connections open as it may; try again."
    closes_connection = True


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    default_message = "MobilePay did not answer in time."


class UpstreamConnectTimeout(ProxyError):
    status = 504
    code = "upstream_connect_timeout"
    default_message = "MobilePay did not accept a connection in time."


class UpstreamSendTimeout(ProxyError):
    status = 504
    code = "upstream_send_timeout"
    default_message = "MobilePay did not take the request in time."


class RequestDeadlineExceeded(ProxyError):
    status = 504
    code = "request_deadline_exceeded"
    default_message = "The request could not be completed within the proxy's deadline."
