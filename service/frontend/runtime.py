"""The front-end's serving pipeline over an engine: admission, header checks, decoding
(where the engine's policy leaves it to the front-end), submission, and draining.

The engine is reached through an `EngineClient` (service/engine_api.py): in this process
(`LocalEngine`) or over the channel (`RemoteEngine`); nothing here knows which. Knows
nothing of HTTP either; the app maps its errors to responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from service.config import Settings
from service.engine_api import (
    ALL_OUTPUTS,
    DevicePolicy,
    EngineClient,
    EngineState,
    ItemDone,
    Pending,
    Served,
)
from service.errors import (
    DeadlineExceeded,
    Draining,
    EngineUnavailable,
    ImageTooLarge,
    InvalidParameter,
    NotReady,
    ServiceError,
)
from service.images.pixel_budget import PixelBudget
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from service.observability.aggregate import Family
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")
LIVENESS_TIMEOUT_S = 2.0  # below the chart's liveness probe timeout


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ImageResult:
    logits: np.ndarray
    embedding: np.ndarray
    decode_s: float
    queued_s: float
    infer_s: float
    batch_size: int


class Runtime:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine: EngineClient) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.threads = settings.thread_plan()
        self._decode_pool = ThreadPoolExecutor(self.threads.decode_workers, "decode")
        self._preprocessor: ImagePreprocessor | None = None
        self._draining = False
        self._in_progress = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_deadline: float | None = None
        self.pixel_budget = PixelBudget(settings.max_decoding_pixels)

    # ------------------------------------------------------------ state

    @property
    def state(self) -> State:
        engine = self.engine.state
        if engine in (EngineState.FAILED, EngineState.GONE):
            return State.FAILED
        if self._draining:
            return State.DRAINING
        return State.READY if engine is EngineState.READY else State.STARTING

    @property
    def engine_gone(self) -> bool:
        return self.engine.state is EngineState.GONE

    @property
    def package(self) -> ModelPackage | None:
        return self.engine.package

    @property
    def served(self) -> Served | None:
        info = self.engine.info
        return None if info is None else info.served

    @property
    def policy(self) -> DevicePolicy | None:
        info = self.engine.info
        return None if info is None else info.policy

    @property
    def decode_in_batch(self) -> bool:
        policy = self.policy
        return policy is not None and policy.decode_in_batch

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def batcher(self) -> object:
        """The in-process batcher (tests look into it); None over the channel."""
        return getattr(self.engine, "batcher", None)

    async def live(self) -> bool:
        """Liveness exercises the engine: a failed load, a dead or wedged engine is not live."""
        if self.state is State.FAILED:
            return False
        return await self.engine.alive(LIVENESS_TIMEOUT_S)

    async def server_metrics(self) -> list[Family] | None:
        """The whole server's metric families when the engine is another process (it merges
        every process's); None in one process, where this registry is the whole server."""
        return await self.engine.server_metrics()

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        await self.engine.start()

    async def wait_loaded(self) -> State:
        """Wait until the engine has loaded the model (or failed to)."""
        await self.engine.wait_settled()
        return self.state

    def begin_drain(self, grace_s: float | None = None) -> None:
        """Readiness goes 503 and new requests are refused; accepted ones carry on. The
        first call with `grace_s` fixes the one deadline the whole shutdown keeps."""
        self._draining = True
        self.metrics.ready.set(0)
        if grace_s is not None and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + grace_s

    def drain_until(self, deadline: float) -> None:
        """`begin_drain` with a deadline fixed elsewhere (the supervisor's, at SIGTERM)."""
        self.begin_drain()
        if self._drain_deadline is None:
            self._drain_deadline = deadline

    def drain_time_left(self, default_s: float) -> float:
        """Seconds left until the drain deadline (`default_s` if no drain has begun)."""
        if self._drain_deadline is None:
            return default_s
        return max(0.0, self._drain_deadline - time.monotonic())

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every accepted request is answered; False if `timeout_s` ran out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float) -> None:
        self.begin_drain()
        await self.engine.close(timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ requests

    def admit(self) -> None:
        """Refuse new work unless ready (503 `not_ready` / `draining`) with room in the
        queue (429): checked before a request's body is read, so a refusal costs nothing."""
        state = self.state
        if state is State.DRAINING:
            raise Draining()
        if state is not State.READY:
            if self.engine_gone:
                raise EngineUnavailable()
            raise NotReady(
                "the model failed to load" if state is State.FAILED else NotReady.message
            )
        self.engine.check_room()

    async def infer(
        self, images: list[bytes], timeout_s: float, outputs: frozenset[str] = ALL_OUTPUTS
    ) -> list[ImageResult]:
        """Decode, batch and run encoded `images`; results in order. Raises `ServiceError`s.

        The request counts as accepted (drain waits for it) from here to its answer.
        """
        return await self._infer(len(images), lambda: self._prepare(images), timeout_s, outputs)

    async def infer_pixels(
        self, pixels: np.ndarray, timeout_s: float, outputs: frozenset[str] = ALL_OUTPUTS
    ) -> list[ImageResult]:
        """Batch and run images already preprocessed by the client: UINT8 `[N, H, W, 3]`
        with H and W the package's crop size (`pixel_shape`), as the decoder would have
        made them. No decoding: each image goes straight to the batcher."""
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.pixel_shape:
            raise InvalidParameter(
                f"pixels must be uint8 [N, {', '.join(map(str, self.pixel_shape))}]; "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )

        async def prepare() -> list[tuple[Pending, float]]:
            return [(np.ascontiguousarray(image), 0.0) for image in pixels]

        return await self._infer(len(pixels), prepare, timeout_s, outputs)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """The shape of one preprocessed image, `(H, W, 3)`, once the package is loaded."""
        assert self.package is not None
        crop = self.package.manifest.preprocessing.crop
        return (crop, crop, 3)

    async def _infer(
        self,
        count: int,
        prepare: Callable[[], Awaitable[list[tuple[Pending, float]]]],
        timeout_s: float,
        outputs: frozenset[str],
    ) -> list[ImageResult]:
        self.admit()
        self._in_progress += 1
        self._idle.clear()
        self.metrics.requests_in_progress.inc()
        futures: list[asyncio.Future[ItemDone]] = []
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                with self.engine.reserve(count) as slots:
                    prepared = await prepare()
                    futures = slots.submit([item for item, _ in prepared], deadline, outputs)
                completed = await asyncio.gather(
                    *(_indexed(index, future) for index, future in enumerate(futures))
                )
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"the request did not complete within {timeout_s * 1000:.0f} ms"
            ) from exc
        except ServiceError as exc:
            if count > 1 and exc.index is not None:  # say which image is bad
                exc.message = f"image {exc.index}: {exc.message}"
            raise
        finally:
            for future in futures:
                future.cancel()  # no-op when done; otherwise the engine skips it
            self._in_progress -= 1
            self.metrics.requests_in_progress.dec()
            if self._in_progress == 0:
                self._idle.set()
        return [
            ImageResult(
                logits=done.value.logits,
                embedding=done.value.embedding,
                decode_s=done.value.decode_s or decoded_in_advance_s,
                queued_s=done.queued_s,
                infer_s=done.value.infer_s,
                batch_size=done.batch_size,
            )
            for done, (_, decoded_in_advance_s) in zip(completed, prepared, strict=True)
        ]

    def _preprocessor_for(self, package: ModelPackage) -> ImagePreprocessor:
        if self._preprocessor is None:
            self._preprocessor = ImagePreprocessor(
                package.manifest.preprocessing, self.settings.max_image_pixels, self.pixel_budget
            )
        return self._preprocessor

    async def _prepare(self, images: list[bytes]) -> list[tuple[Pending, float]]:
        """What to queue for each image, with the seconds spent decoding it here. Every
        header is checked first (format, pixels per image and per request); then, when
        decoding happens in the batch, the bytes are queued, else the pixels are decoded
        now on the decode pool."""
        assert self.package is not None
        preprocessor = self._preprocessor_for(self.package)
        total = 0
        for index, data in enumerate(images):
            with _image_index(index):
                total += preprocessor.check(data)
        limit = self.settings.max_request_pixels
        if total > limit:
            raise ImageTooLarge(
                f"the request's images hold {total} pixels in all; the limit is {limit}"
            )
        if self.decode_in_batch:
            return [(data, 0.0) for data in images]
        loop = asyncio.get_running_loop()

        async def decode(index: int, data: bytes) -> tuple[Pending, float]:
            with _image_index(index):
                return await loop.run_in_executor(self._decode_pool, self._decode_timed, data)

        return list(await asyncio.gather(*(decode(i, data) for i, data in enumerate(images))))

    def _decode_timed(self, data: bytes) -> tuple[np.ndarray, float]:
        assert self._preprocessor is not None
        started = time.perf_counter()
        pixels = self._preprocessor(data)
        elapsed = time.perf_counter() - started
        self.metrics.decode_duration.observe(elapsed)
        return pixels, elapsed


async def _indexed(index: int, future: asyncio.Future[ItemDone]) -> ItemDone:
    """Await one image's result, tagging a client error with the image it concerns (an
    image that fails to decode inside a batch fails through its future)."""
    with _image_index(index):
        return await future


@contextmanager
def _image_index(index: int) -> Iterator[None]:
    """Tag a client error with the index of the request's image that caused it. Server
    errors are left alone: one instance may fail a whole batch, several requests' images."""
    try:
        yield
    except ServiceError as error:
        if error.status < 500 and error.index is None:
            error.index = index
        raise


def error_reason(error: ServiceError) -> str:
    """The `reason` label of `resnet_rejections_total` for an error."""
    return {
        "queue_full": "queue_full",
        "draining": "draining",
        "not_ready": "not_ready",
        "engine_unavailable": "engine_unavailable",
        "deadline_exceeded": "deadline",
        "client_closed_request": "client_disconnected",
        "too_busy": "too_busy",
        "request_timeout": "body_timeout",
        "unauthorized": "unauthorized",
        "inference_failed": "internal",
        "internal_error": "internal",
    }.get(error.code, "bad_input")
