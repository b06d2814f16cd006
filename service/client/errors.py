"""What a client call raises: one class per way a call can fail, each carrying the
service's error code, so callers branch on types (or `.code`), never on message text.

    ServiceError                  anything a call raises: .status, .code, .message, .request_id
    ├── BadInput                  4xx: the request itself is wrong; retrying cannot help
    │   └── Unauthorized          401: missing or wrong API key
    ├── Overloaded                429: queue full or too much data in flight (retried)
    ├── Unavailable               503: model loading or server draining (retried)
    ├── DeadlineExceeded          504: the server's deadline for the request passed
    ├── ServerFault               other 5xx (inference failed, a proxy's 502, ...)
    └── ConnectionFailed          no response: refused, reset, or the client's timeout
        └── Timeout               the client's own timeout passed
"""

from __future__ import annotations

from collections.abc import Mapping


class ServiceError(Exception):
    """A failed call. `status` is the HTTP status (None when no response came), `code`
    the service's machine-readable code (`queue_full`, `invalid_image`, ...), `request_id`
    the `X-Request-ID` the server logged it under, `attempts` how many tries were made."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.attempts = 1

    def __str__(self) -> str:
        status = f"HTTP {self.status} " if self.status is not None else ""
        request = f" [request {self.request_id}]" if self.request_id else ""
        return f"{status}{self.code}: {self.message}{request}"


class BadInput(ServiceError):
    """The service refused the request (400, 408, 413, 415, 422, 404, ...)."""


class Unauthorized(BadInput):
    """No API key, or not one the service accepts."""


class Overloaded(ServiceError):
    """The service is at capacity (`queue_full`, `too_busy`): retried after `Retry-After`."""

    retryable = True


class Unavailable(ServiceError):
    """The model is not loaded yet (`not_ready`) or the server is draining (`draining`):
    retried, which reaches another replica behind a load balancer."""

    retryable = True


class DeadlineExceeded(ServiceError):
    """The server gave up on the request at its deadline. Not retried: the server was too
    busy to answer in time, and a retry would add to that."""


class ServerFault(ServiceError):
    """Any other 5xx: a bug or an inference failure on the server, or a proxy's error."""


class ConnectionFailed(ServiceError):
    """No response: the connection was refused, reset or timed out. Retried only when the
    request cannot have reached the server (the connection was never made)."""

    def __init__(self, message: str, *, request_id: str | None = None, sent: bool) -> None:
        super().__init__(message, code="connection_failed", request_id=request_id)
        self.retryable = not sent


class Timeout(ConnectionFailed):
    """The client's own timeout passed (see `timeout=`)."""

    def __init__(self, message: str, *, request_id: str | None = None, sent: bool) -> None:
        super().__init__(message, request_id=request_id, sent=sent)
        self.code = "timeout"


def error_for(
    status: int,
    body: object,
    headers: Mapping[str, str],
    fallback_text: str = "",
) -> ServiceError:
    """The exception for an error response: the service's `{"error": {"code", "message"}}`
    when the body has it, else (a proxy's page, say) `http_<status>` and the text."""
    code, message = f"http_{status}", fallback_text.strip()[:200] or f"HTTP {status}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        message = str(error.get("message", message))
    kind: type[ServiceError]
    if status == 401:
        kind = Unauthorized
    elif status == 429:
        kind = Overloaded
    elif status == 503:
        kind = Unavailable
    elif status == 504:
        kind = DeadlineExceeded
    elif 400 <= status < 500:
        kind = BadInput
    else:
        kind = ServerFault
    return kind(
        message,
        status=status,
        code=code,
        request_id=headers.get("x-request-id"),
        retry_after_s=retry_after(headers.get("retry-after")),
    )


def retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds, or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds else None  # not NaN
    from datetime import UTC, datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
