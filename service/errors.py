"""Every failure a client can see, each with its HTTP status and a stable machine-readable code.

Nothing here knows about FastAPI: the app turns a `ServiceError` into
`{"error": {"code": ..., "message": ...}}` with `status` as the HTTP status.
"""

from __future__ import annotations

_SHOWN_CHARS = 32


def shown(value: object) -> str:
    """A client value as it may appear in an error message: quoted and cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def clipped(error: BaseException, limit: int = 120) -> str:
    """A library's error text, cut short: some quote the input they choked on."""
    text = str(error)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    message: str = "internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}
        self.index: int | None = None  # which of a request's images it concerns, if any

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidImage(ServiceError):
    status = 400
    code = "invalid_image"
    message = "the image could not be decoded"


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"
    message = "the request body could not be read"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    message = "the request body is too large"


class TooManyImages(ServiceError):
    status = 413
    code = "too_many_images"
    message = "the request carries too many images"


class ImageTooLarge(ServiceError):
    status = 413
    code = "image_too_large"
    message = "the image has too many pixels"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    message = "a valid API key is required: send 'Authorization: Bearer <key>'"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"
    message = "the request body was not received in time"

    def __init__(self, message: str | None = None) -> None:
        # The rest of the body may still be on its way: the connection cannot be reused.
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"
    message = "unsupported media type"


class NotFound(ServiceError):
    """An Open Inference Protocol request names a model or version this server does not serve."""

    status = 404
    code = "not_found"
    message = "no such model"


class InvalidParameter(ServiceError):
    status = 422
    code = "invalid_parameter"
    message = "invalid parameter"


class QueueFull(ServiceError):
    status = 429
    code = "queue_full"
    message = "the server is at capacity; retry later"


class TooBusy(ServiceError):
    """Too many request bodies are held in memory already: refused before reading this one."""

    status = 429
    code = "too_busy"
    message = "the server holds too much request data already; retry later"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1", "Connection": "close"})


class ClientClosedRequest(ServiceError):
    """The client went away; nobody reads this response (nginx calls it 499)."""

    status = 499
    code = "client_closed_request"
    message = "the client closed the connection"


class InferenceFailed(ServiceError):
    status = 500
    code = "inference_failed"
    message = "inference failed for this batch"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"
    message = "the model is still loading"


class Draining(ServiceError):
    status = 503
    code = "draining"
    message = "the server is shutting down"


class EngineUnavailable(ServiceError):
    """The engine process is gone: nothing in flight will be answered, and the server is
    exiting so that it is restarted."""

    status = 503
    code = "engine_unavailable"
    message = "the inference engine stopped; the server is restarting"


class DeadlineExceeded(ServiceError):
    status = 504
    code = "deadline_exceeded"
    message = "the request did not complete within its deadline"


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def error_from(
    code: str, message: str, status: int, headers: dict[str, str] | None = None
) -> ServiceError:
    """The error a code names, rebuilt on the other side of a process boundary."""
    for cls in _subclasses(ServiceError):
        if cls.code == code and cls.status == status:
            error = cls(message)
            break
    else:
        error = ServiceError(message)
        error.status, error.code = status, code
    error.headers = {**error.headers, **(headers or {})}
    return error
