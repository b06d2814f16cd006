"""The service's REST API as both clients see it: the requests they send and what they
make of the responses. No I/O here, so `Client` and `AsyncClient` differ only in how
they wait.

Images go as `multipart/form-data` (a `files` part each: any image type, no base64
inflation), parameters in the query string. Embeddings are asked for as base64 float32
(`encoding=base64`, ~2.5x smaller than JSON floats) and returned as one numpy array.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from service.client.errors import ConnectionFailed, ServiceError, Timeout, error_for

if TYPE_CHECKING:
    import numpy as np

USER_AGENT = "resnet-serve-client"


@dataclass(frozen=True, slots=True)
class Prediction:
    """One of an image's top-k classes: `score` is the softmax probability."""

    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Call:
    """One API call, as many times as it is tried: the same request and request id."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        files = [
            ("files", (f"image-{index}", data, "application/octet-stream"))
            for index, data in enumerate(self.images)
        ]
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            files=files or None,
            headers={"x-request-id": self.request_id},
        )


def predict_call(images: list[bytes], top_k: int | None) -> Call:
    params = {} if top_k is None else {"top_k": str(top_k)}
    return Call("POST", "/predict", params, images)


def embed_call(images: list[bytes], normalize: bool) -> Call:
    params = {"normalize": "true" if normalize else "false", "encoding": "base64"}
    return Call("POST", "/embed", params, images)


def http_options(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout
) -> dict[str, Any]:
    """What both clients give their httpx client."""
    headers = {"user-agent": USER_AGENT}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"  # what service/frontend/security.py checks
    return {"base_url": base_url, "headers": headers, "timeout": timeout}


def failure(response: httpx.Response) -> ServiceError:
    try:
        body: object = response.json()
    except ValueError:
        body = None
    return error_for(response.status_code, body, response.headers, response.text)


def connection_failure(exc: httpx.TransportError, call: Call) -> ConnectionFailed:
    # Only a connection never made (or never taken from the pool) is known not to have
    # reached the server; anything later may have.
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    kind = Timeout if isinstance(exc, httpx.TimeoutException) else ConnectionFailed
    what = f"{call.method} {call.path}: {type(exc).__name__}: {exc}".rstrip(": ")
    error = kind(what, request_id=call.request_id, sent=sent)
    error.__cause__ = exc
    return error


def predictions(response: httpx.Response) -> list[list[Prediction]]:
    try:
        return [
            [Prediction(str(p["label"]), int(p["index"]), float(p["score"])) for p in image]
            for image in response.json()["predictions"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise bad_reply(response, exc) from exc


def embeddings(response: httpx.Response) -> np.ndarray:
    """An (images, dim) float32 array, row i for image i."""
    import numpy as np

    try:
        body = response.json()
        dim = int(body["dim"])
        rows = [np.frombuffer(base64.b64decode(text), dtype="<f4") for text in body["embeddings"]]
        if not rows or any(row.shape != (dim,) for row in rows):
            raise ValueError(f"expected vectors of {dim} float32 values")
    except (KeyError, TypeError, ValueError) as exc:
        raise bad_reply(response, exc) from exc
    return np.stack(rows).astype(np.float32, copy=False)  # native byte order


def bad_reply(response: httpx.Response, error: Exception) -> ServiceError:
    """A 2xx that is not what this API answers (a proxy's page, another service)."""
    return ServiceError(
        f"the reply is not the service's: {type(error).__name__}: {error}"[:300],
        status=response.status_code,
        code="bad_reply",
        request_id=response.headers.get("x-request-id"),
    )
