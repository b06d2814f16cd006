"""The engine's side of serving: load and warm the model, batch images onto it, decode
in the batch where the policy says so, and drain.

Everything here lives where the runtime (ONNX Runtime or OpenVINO) lives: in the engine
process, or in the one process of `--workers 0`. Knows nothing of HTTP or of the
front-ends; callers reach it through an `EngineClient` (`service.engine.local`, or the
channel's engine side).

Decoding has two placements (`DevicePolicy.decode_in_batch`). On GPUs each image is
decoded by the front-end before it is queued, while the engine runs other batches. On
CPUs, where decoding and inference share the cores and overlapping them only slows both,
an image is queued as bytes and decoded as the first step of its batch (on the decode
pool, in parallel).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from service.config import Settings
from service.engine.batching import BatchObserver, DynamicBatcher
from service.engine.loading import (
    Engine,
    EngineFactory,
    load_engine,
    log_load,
    log_plan,
    record_load,
)
from service.engine.policy import device_policy, with_measured_engine
from service.engine.providers import check_providers
from service.engine_api import DevicePolicy, EngineInfo, EngineState, ImageOutput, Pending, Served
from service.errors import ServiceError
from service.images.pixel_budget import PixelBudget
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")


class EngineCore:
    """The model, its batcher and the function that runs a batch."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        engine_factory: EngineFactory = load_engine,
        observer: BatchObserver | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = EngineState.STARTING
        self.failure: str | None = None  # for the log only, never clients
        self.package: ModelPackage | None = None
        self.served: Served | None = None
        self.policy: DevicePolicy | None = None  # decided once the device is known
        self.threads = settings.thread_plan()  # re-planned for the device once loaded
        self._engine_factory = engine_factory
        self._observer = observer or metrics
        self._engine: Engine | None = None
        self._preprocessor: ImagePreprocessor | None = None
        self._batcher: DynamicBatcher[Pending, ImageOutput] | None = None
        self._decode_pool = ThreadPoolExecutor(self.threads.decode_workers, "engine-decode")
        self._settled = asyncio.Event()  # set once loading has succeeded or failed
        self.pixel_budget = PixelBudget(settings.max_decoding_pixels)
        metrics.queue_capacity.set(settings.max_queue_size)

    @property
    def info(self) -> EngineInfo | None:
        if self.served is None or self.policy is None:
            return None
        return EngineInfo(self.served, self.policy, self.threads.describe())

    @property
    def batcher(self) -> DynamicBatcher[Pending, ImageOutput] | None:
        return self._batcher

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Load, warm up, start batching; the state says how it went (never raises)."""
        try:
            await self._load()
        finally:
            self._settled.set()

    async def wait_settled(self) -> EngineState:
        await self._settled.wait()
        return self.state

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self._load_blocking)
        except Exception as exc:
            self.state = EngineState.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"
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
                partial(self._run_batch, alone=True)
                if self._engine.has_solo_session and policy.lone_batches_alone
                else None
            ),
            observer=self._observer,
            thread_name_prefix="engine",
        )
        self._batcher.start()
        self.state = EngineState.READY
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
            list(report.requested), report.reason, engine.runtime, engine.runtime_version,
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
        ms_per_image = engine.warm_up(sizes)
        self.policy = with_measured_engine(self.policy, self.settings, ms_per_image)
        self._engine = engine
        load_s, warm_s = warm_started - started, time.perf_counter() - warm_started
        record_load(
            self.metrics, self.settings, manifest, precision, engine, report, load_s, warm_s
        )
        log_load(manifest, precision, engine, sizes, load_s, warm_s)
        log_plan(self.threads, self.policy, engine.device, engine.runtime)

    def stop_admitting(self) -> None:
        """Readiness goes to 0 in /metrics: the server is draining or has failed."""
        self.metrics.ready.set(0)

    async def close(self, timeout_s: float) -> None:
        self.stop_admitting()
        if self._batcher is not None:
            await self._batcher.close(timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ batches

    def decode_timed(self, data: bytes) -> tuple[np.ndarray, float]:
        """Decode one image here (on a decode thread), timed and counted."""
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
            return self.decode_timed(item)
        except ServiceError as error:
            return error, 0.0

    def _run_batch(
        self, items: list[Pending], alone: bool = False
    ) -> list[ImageOutput | BaseException]:
        """Runs on the engine thread. Encoded images are decoded first (on the decode pool,
        in parallel) and an image that fails to decode fails alone; then the engine runs on
        the rest (on every CPU if the batch runs alone, which the batcher decides)."""
        assert self._engine is not None
        if len(items) == 1 or all(isinstance(item, np.ndarray) for item in items):
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
