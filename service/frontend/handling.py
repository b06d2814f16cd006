"""The path every image request takes, whatever its endpoint or protocol.

In order, each step refusing as early and as cheaply as it can:
1. parameters in the query string are validated (422) before anything else;
2. the runtime must be ready, not draining, with room in its queue (503/429) before the
   body is read;
3. the body is read within `body_timeout_s` (408), its size capped (413) and its bytes
   held against the budget shared by all requests in progress (429) until the response;
4. the images are parsed out of it (400/413/415), the body's own fields validated (422);
5. the runtime decodes, batches and runs them, cancelled if the client goes away;
6. the endpoint renders the results.
Every outcome is counted once: requests by status, rejections by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.types import Message

from service.config import Settings
from service.engine_api import ALL_OUTPUTS
from service.errors import ClientClosedRequest, RequestTimeout, ServiceError
from service.frontend.limits import ByteBudget, Lease
from service.frontend.params import check_fields
from service.frontend.payloads import Payload, parse_payload, read_body
from service.frontend.responses import error_response
from service.frontend.runtime import ImageResult, Runtime, error_reason
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")
T = TypeVar("T")
P = TypeVar("P")


async def _wait_for_disconnect(receive: Callable[[], Awaitable[Message]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client goes away first (its queued images are then
    skipped before they reach the engine)."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        work_task.cancel()
        with suppress(asyncio.CancelledError, ServiceError):
            await work_task
        raise ClientClosedRequest()
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()


def server_timing(results: list[ImageResult], total_s: float) -> str:
    """Where the request's time went, in ms: the slowest image's decode, queue wait and
    engine run, and the whole request in the app (everything but the network)."""
    decode = max(r.decode_s for r in results) * 1000
    queued = max(r.queued_s for r in results) * 1000
    run = max(r.infer_s for r in results) * 1000
    batch = max(r.batch_size for r in results)
    return (
        f"decode;dur={decode:.2f}, queue;dur={queued:.2f}, "
        f'infer;dur={run:.2f};desc="batch {batch}", app;dur={total_s * 1000:.2f}'
    )


@dataclass
class Tally:
    """What one request amounted to, filled in as it goes; counted when it ends."""

    status: int = 500
    images: int = 0


class ImageRequests:
    """Serves image requests for every protocol (see the module docstring): the REST API
    through `serve`, the others through `counted`, `read_body` and `run`."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: ServiceMetrics) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.body_budget = ByteBudget(settings.max_buffered_bytes)

    @asynccontextmanager
    async def counted(self, endpoint: str) -> AsyncIterator[Tally]:
        """Count the request once, whatever its outcome: by status, its rejection by
        reason, its duration and its images. A `ServiceError` passes through."""
        started = time.perf_counter()
        tally = Tally()
        try:
            yield tally
        except ServiceError as error:
            tally.status = error.status
            self.metrics.rejections.labels(error_reason(error)).inc()
            raise
        except asyncio.CancelledError:  # gRPC: the client cancelled, or its connection went
            tally.status = ClientClosedRequest.status
            self.metrics.rejections.labels("client_disconnected").inc()
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(tally.status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)
            if tally.images:
                self.metrics.images.labels(endpoint).inc(tally.images)

    async def run(
        self,
        images: list[bytes] | np.ndarray,
        request: Request | None = None,
        outputs: frozenset[str] = ALL_OUTPUTS,
    ) -> list[ImageResult]:
        """Decode (unless given pixels), batch and run the images within the request
        deadline; over HTTP, cancelled if the client goes away. `outputs`: those the
        response needs (the others may come back empty)."""
        timeout_s = self.settings.request_timeout_ms / 1000
        return await self.run_within(images, timeout_s, request, outputs)

    async def run_within(
        self,
        images: list[bytes] | np.ndarray,
        timeout_s: float,
        request: Request | None = None,
        outputs: frozenset[str] = ALL_OUTPUTS,
    ) -> list[ImageResult]:
        """`run` with a deadline of `timeout_s`: the client's own, where it sent one (gRPC)."""
        if isinstance(images, np.ndarray):
            work = self.runtime.infer_pixels(images, timeout_s, outputs)
        else:
            work = self.runtime.infer(images, timeout_s, outputs)
        if request is None:
            return await work  # gRPC cancels the handler's task when the client goes
        results = await until_disconnected(request, work)
        if request.app.state.tracing is not None:  # spans: decode, queue_wait, inference
            request.app.state.tracing.record_stages(results, self.runtime.decode_in_batch)
        return results

    async def serve(
        self,
        request: Request,
        endpoint: str,
        fields: frozenset[str],
        read_params: Callable[[Mapping[str, object]], P],
        render: Callable[[list[ImageResult], P], Response],
        outputs: frozenset[str] = ALL_OUTPUTS,
    ) -> Response:
        started = time.perf_counter()
        lease = Lease(self.body_budget)
        try:
            async with self.counted(endpoint) as tally:
                query = dict(request.query_params)
                read_params(query)
                self.runtime.admit()
                payload = await self._read_payload(request, lease)
                check_fields(payload.fields, fields)
                params = read_params({**query, **payload.fields})
                results = await self.run(payload.images, request, outputs)
                response = render(results, params)
                elapsed = time.perf_counter() - started
                response.headers["Server-Timing"] = server_timing(results, elapsed)
                tally.status, tally.images = response.status_code, len(results)
                return response
        except ServiceError as error:
            return error_response(error)
        finally:
            lease.release()

    async def read_body(self, request: Request, lease: Lease) -> bytes:
        """The body, within `body_timeout_s` (408), capped at `max_body_bytes` (413), its
        bytes held against the shared budget by `lease` (429)."""
        settings = self.settings
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                return await read_body(
                    request.stream(),
                    request.headers.get("content-length"),
                    settings.max_body_bytes,
                    lease,
                )
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the request body was not received within {settings.body_timeout_s:g} s"
            ) from exc

    async def _read_payload(self, request: Request, lease: Lease) -> Payload:
        body = await self.read_body(request, lease)
        return parse_payload(
            request.headers.get("content-type"), body, self.settings.max_images_per_request
        )
