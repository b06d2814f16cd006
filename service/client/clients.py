"""`Client` (blocking) and `AsyncClient` (asyncio): the same calls, the same retries and
errors; they differ only in how they wait (see api.py for what they share)."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from service.client import api
from service.client.api import Call, Prediction
from service.client.errors import ConnectionFailed, ServiceError, Unavailable
from service.client.images import Images, encode_all
from service.client.retry import RetryPolicy

if TYPE_CHECKING:
    import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"
NO_RETRY = RetryPolicy(retries=0)
# Per network operation (connect, each read/write), not the whole call; the server's own
# deadline (--request-timeout-ms, 30 s by default) answers 504 before this passes.
DEFAULT_TIMEOUT_S = 60.0


class Client:
    """A blocking client of one resnet-serve server (or a load balancer in front of many).

    `api_key` is sent as `Authorization: Bearer <key>`; `timeout` (seconds, or an
    `httpx.Timeout`) bounds each network operation; `retries` is the number of retries
    on 429/503 and unmade connections, or a `RetryPolicy` with a time budget. Use it as a
    context manager, or call `close()`: it keeps connections open between calls.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retries: int | RetryPolicy = 3,
    ) -> None:
        self.retry = RetryPolicy.of(retries)
        self._http = httpx.Client(**api.http_options(base_url, api_key, timeout))

    def predict(self, images: Images, *, top_k: int | None = None) -> list[list[Prediction]]:
        """The top-k classes of each image, highest score first; one list per image, in
        order. `top_k` defaults to the server's setting (5)."""
        return api.predictions(self._send(api.predict_call(encode_all(images), top_k)))

    def embed(self, images: Images, *, normalize: bool = True) -> np.ndarray:
        """Embedding vectors: a float32 array of shape (images, dim), row i for image i;
        L2-normalised unless `normalize=False`."""
        return api.embeddings(self._send(api.embed_call(encode_all(images), normalize)))

    def health(self) -> bool:
        """Liveness (`/healthz`): False when the model failed to load or no server answers."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """Readiness (`/readyz`): True once the model is loaded and warm, False while it
        loads, while the server drains, or when no server answers."""
        return self._probe("/readyz")

    def info(self) -> dict[str, Any]:
        """`/info`: the model served, precision, batching settings, limits."""
        body: dict[str, Any] = self._send(Call("GET", "/info")).json()
        return body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _probe(self, path: str) -> bool:
        try:
            self._send(Call("GET", path), NO_RETRY)
        except (Unavailable, ConnectionFailed):
            return False
        return True

    def _send(self, call: Call, policy: RetryPolicy | None = None) -> httpx.Response:
        attempts = (policy or self.retry).start()
        while True:
            error: ServiceError
            try:
                response = self._http.send(call.build(self._http))
            except httpx.TransportError as exc:
                error = api.connection_failure(exc, call)
            else:
                if response.is_success:
                    return response
                error = api.failure(response)
            delay = attempts.next_delay(error)
            if delay is None:
                raise error
            time.sleep(delay)


class AsyncClient:
    """The asyncio twin of `Client`: the same arguments, the same calls, awaited. Images
    are read and encoded in a worker thread, off the event loop."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        retries: int | RetryPolicy = 3,
    ) -> None:
        self.retry = RetryPolicy.of(retries)
        self._http = httpx.AsyncClient(**api.http_options(base_url, api_key, timeout))

    async def predict(self, images: Images, *, top_k: int | None = None) -> list[list[Prediction]]:
        encoded = await asyncio.to_thread(encode_all, images)
        return api.predictions(await self._send(api.predict_call(encoded, top_k)))

    async def embed(self, images: Images, *, normalize: bool = True) -> np.ndarray:
        encoded = await asyncio.to_thread(encode_all, images)
        return api.embeddings(await self._send(api.embed_call(encoded, normalize)))

    async def health(self) -> bool:
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        return await self._probe("/readyz")

    async def info(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self._send(Call("GET", "/info"))).json()
        return body

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _probe(self, path: str) -> bool:
        try:
            await self._send(Call("GET", path), NO_RETRY)
        except (Unavailable, ConnectionFailed):
            return False
        return True

    async def _send(self, call: Call, policy: RetryPolicy | None = None) -> httpx.Response:
        attempts = (policy or self.retry).start()
        while True:
            error: ServiceError
            try:
                response = await self._http.send(call.build(self._http))
            except httpx.TransportError as exc:
                error = api.connection_failure(exc, call)
            else:
                if response.is_success:
                    return response
                error = api.failure(response)
            delay = attempts.next_delay(error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
