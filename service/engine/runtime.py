"""The serving pipeline behind the endpoints: load and warm the model, decode images on a
thread pool, batch them onto the engine, and drain on shutdown.

Decoding has two placements (`Settings.overlap_decode`). On GPUs each image is decoded on
the decode pool before it is queued, while the engine runs other batches. On CPUs, where
decoding and inference share the cores and overlapping them only slows both, an image is
checked from its header at the door, queued as bytes, and decoded as the first step of
its batch (on the pool, in parallel). Knows nothing of HTTP; the app maps its errors to
responses.
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
from functools import partial

import numpy as np

from service.config import Settings
from service.engine.batching import Completed, DynamicBatcher
from service.engine.loading import (
    Engine,
    EngineFactory,
    Served,
    load_onnx_engine,
    log_load,
    log_plan,
    record_load,
)
from service.engine.policy import DevicePolicy, device_policy
from service.engine.providers import check_providers
from service.errors import (
    DeadlineExceeded,
    Draining,
    ImageTooLarge,
    InvalidParameter,
    NotReady,
    ServiceError,
)
from service.images.pixel_budget import PixelBudget
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")

Pending = np.ndarray | bytes  # what the batcher carries: decoded pixels, or bytes to decode


@dataclass(frozen=True)
class ImageOutput:
    """One image's share of a batch run."""

    logits: np.ndarray
    embedding: np.ndarray
    decode_s: float  # 0 when it was decoded before it was queued
    infer_s: float


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
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        engine_factory: EngineFactory = load_onnx_engine,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.STARTING
        self.failure: str | None = None
        self.package: ModelPackage | None = None
        self.served: Served | None = None
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._preprocessor: ImagePreprocessor | None = None
        self._batcher: DynamicBatcher[Pending, ImageOutput] | None = None
        self.policy: DevicePolicy | None = None  # decided once the device is known
        self.threads = settings.thread_plan()  # re-planned for the device once loaded
        self._decode_pool = ThreadPoolExecutor(self.threads.decode_workers, "decode")
        self._in_progress = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._settled = asyncio.Event()  # set once loading has succeeded or failed
        self._drain_deadline: float | None = None
        self.pixel_budget = PixelBudget(settings.max_decoding_pixels)
        metrics.queue_capacity.set(settings.max_queue_size)

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Load, warm up, start batching; the state says how it went (never raises)."""
        try:
            await self._load()
        finally:
            self._settled.set()

    async def wait_loaded(self) -> State:
        await self._settled.wait()
        return self.state

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self._load_blocking)
        except Exception as exc:
            self.state = State.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"  # for the log only, never clients
            log.error("model failed to load: %s", self.failure)
            return
        assert self._engine is not None
        assert self.policy is not None
        policy = self.policy
        self._batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_queue_delay_s=self.settings.max_queue_delay_ms / 1000,
            max_queue_size=self.settings.max_queue_size,
            max_concurrent_batches=policy.concurrent_batches,
            partial_batches_while_busy=policy.partial_batches_while_busy,
            busy_batch_size=policy.busy_batch_size,
            run_alone=(
                partial(self._run_batch, alone=True) if self._engine.has_solo_session else None
            ),
            observer=self.metrics,
            thread_name_prefix="engine",
        )
        self._batcher.start()
        if self.state is State.STARTING:
            self.state = State.READY
            self.metrics.ready.set(1)
            log.info("ready: serving on %s", self.served.device if self.served else "?")

    def _load_blocking(self) -> None:
        started = time.perf_counter()
        package = ModelPackage.load(self.settings.model_dir)
        manifest = package.manifest
        self.package = package
        engine, precision, warnings = self._engine_factory(self.settings, package)
        report = check_providers(engine.providers_requested, engine.providers)
        self.served = Served(
            precision, list(engine.providers), engine.device, warnings,
            list(report.requested), report.reason,
        )  # fmt: skip
        for warning in warnings:
            log.warning(warning)
        if not manifest.trained:
            log.warning(
                "THIS MODEL IS UNTRAINED: %s was exported from random weights (seed %s). "
                "Its labels and scores are meaningless; export trained weights for real use.",
                manifest.name,
                manifest.source.seed,
            )
        self.threads = self.settings.thread_plan(gpu=engine.device != "cpu")
        self.policy = device_policy(self.settings, self.threads, engine.device)
        self._preprocessor = ImagePreprocessor(
            manifest.preprocessing, self.settings.max_image_pixels, self.pixel_budget
        )
        sizes = self.policy.warmup_sizes
        warm_started = time.perf_counter()
        engine.warm_up(sizes)
        self._engine = engine
        load_s, warm_s = warm_started - started, time.perf_counter() - warm_started
        record_load(
            self.metrics, self.settings, manifest, precision, engine, report, load_s, warm_s
        )
        log_load(manifest, precision, engine, sizes, load_s, warm_s)
        log_plan(self.threads, self.policy, engine.device)

    def begin_drain(self, grace_s: float | None = None) -> None:
        """Readiness goes 503 and new requests are refused; accepted ones carry on. The
        first call with `grace_s` fixes the one deadline the whole shutdown keeps."""
        if self.state is not State.FAILED:
            self.state = State.DRAINING
        self.metrics.ready.set(0)
        if grace_s is not None and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + grace_s

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
        if self._batcher is not None:
            await self._batcher.close(timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def decode_in_batch(self) -> bool:
        return self.policy is not None and self.policy.decode_in_batch

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def batcher(self) -> DynamicBatcher[Pending, ImageOutput] | None:
        return self._batcher

    # ------------------------------------------------------------ requests

    def admit(self) -> None:
        """Refuse new work unless ready (503 `not_ready` / `draining`) with room in the
        queue (429): checked before a request's body is read, so a refusal costs nothing."""
        if self.state is State.DRAINING:
            raise Draining()
        if self.state is not State.READY:
            raise NotReady(
                "the model failed to load" if self.state is State.FAILED else NotReady.message
            )
        if self._batcher is not None:
            self._batcher.check_room()

    async def infer(self, images: list[bytes], timeout_s: float) -> list[ImageResult]:
        """Decode, batch and run encoded `images`; results in order. Raises `ServiceError`s.

        The request counts as accepted (drain waits for it) from here to its answer.
        """
        return await self._infer(len(images), lambda: self._prepare(images), timeout_s)

    async def infer_pixels(self, pixels: np.ndarray, timeout_s: float) -> list[ImageResult]:
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

        return await self._infer(len(pixels), prepare, timeout_s)

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
    ) -> list[ImageResult]:
        self.admit()
        assert self._batcher is not None
        self._in_progress += 1
        self._idle.clear()
        self.metrics.requests_in_progress.inc()
        futures: list[asyncio.Future[Completed[ImageOutput]]] = []
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                with self._batcher.reserve(count) as slots:
                    prepared = await prepare()
                    futures = [slots.submit(item, deadline) for item, _ in prepared]
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
                future.cancel()  # no-op when done; otherwise the batcher skips it
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

    async def _prepare(self, images: list[bytes]) -> list[tuple[Pending, float]]:
        """What to queue for each image, with the seconds spent decoding it here. Every
        header is checked first (format, pixels per image and per request); then, when
        decoding happens in the batch, the bytes are queued, else the pixels are decoded
        now on the decode pool."""
        assert self._preprocessor is not None
        total = 0
        for index, data in enumerate(images):
            with _image_index(index):
                total += self._preprocessor.check(data)
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

    def _decode_or_error(self, item: Pending) -> tuple[np.ndarray | ServiceError, float]:
        if isinstance(item, np.ndarray):
            return item, 0.0
        try:
            return self._decode_timed(item)
        except ServiceError as error:
            return error, 0.0

    def _run_batch(
        self, items: list[Pending], alone: bool = False
    ) -> list[ImageOutput | BaseException]:
        """Runs on the engine thread. With in-batch decoding, the batch's images are
        decoded first (on the decode pool, in parallel) and an image that fails to decode
        fails alone; then the engine runs on the rest (on every CPU if the batch runs
        alone, which the batcher decides)."""
        assert self._engine is not None
        if len(items) == 1 or not self.decode_in_batch:
            decoded = [self._decode_or_error(item) for item in items]
        else:
            decoded = list(self._decode_pool.map(self._decode_or_error, items))
        pixels = [value for value, _ in decoded if isinstance(value, np.ndarray)]
        logits = embeddings = np.empty((0, 0), dtype=np.float32)
        started = time.perf_counter()
        if pixels:
            logits, embeddings = self._engine.run(np.stack(pixels), alone)
        infer_s = time.perf_counter() - started
        outputs: list[ImageOutput | BaseException] = []
        row = 0
        for value, decode_s in decoded:
            if isinstance(value, ServiceError):
                outputs.append(value)
                continue
            outputs.append(ImageOutput(logits[row], embeddings[row], decode_s, infer_s))
            row += 1
        return outputs


async def _indexed(
    index: int, future: asyncio.Future[Completed[ImageOutput]]
) -> Completed[ImageOutput]:
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
        "deadline_exceeded": "deadline",
        "client_closed_request": "client_disconnected",
        "too_busy": "too_busy",
        "request_timeout": "body_timeout",
        "unauthorized": "unauthorized",
        "inference_failed": "internal",
        "internal_error": "internal",
    }.get(error.code, "bad_input")
