"""`LocalEngine`: the engine in the front-end's own process and event loop.

Used with `--workers 0` (one process: no shared memory, no channel) and by the tests that
serve through a test double of the engine. The front-end sees the same `EngineClient` as
it does over the channel (`service.channel.client.RemoteEngine`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast

from service.config import Settings
from service.engine.batching import DynamicBatcher, Reservation
from service.engine.core import EngineCore
from service.engine.loading import EngineFactory, load_engine
from service.engine_api import EngineInfo, EngineState, ImageOutput, ItemDone, Pending
from service.errors import NotReady
from service.model_package import ModelPackage
from service.observability.metrics import ServiceMetrics


class LocalSlots:
    """Queue slots on the in-process batcher (outputs are all computed anyway)."""

    def __init__(self, reservation: Reservation[Pending, ImageOutput]) -> None:
        self._reservation = reservation

    def submit(
        self, items: Sequence[Pending], deadline: float, outputs: frozenset[str]
    ) -> list[asyncio.Future[ItemDone]]:
        futures = [self._reservation.submit(item, deadline) for item in items]
        return cast(list[asyncio.Future[ItemDone]], futures)

    def __enter__(self) -> LocalSlots:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._reservation.release()


class LocalEngine:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        engine_factory: EngineFactory = load_engine,
    ) -> None:
        self.core = EngineCore(settings, metrics, engine_factory)
        self._loading: asyncio.Task[None] | None = None

    @property
    def state(self) -> EngineState:
        return self.core.state

    @property
    def package(self) -> ModelPackage | None:
        return self.core.package

    @property
    def info(self) -> EngineInfo | None:
        return self.core.info

    @property
    def batcher(self) -> DynamicBatcher[Pending, ImageOutput] | None:
        return self.core.batcher

    async def start(self) -> None:
        # Load in the background: /healthz answers at once, /readyz turns 200 when warm.
        self._loading = asyncio.create_task(self.core.load(), name="load-model")

    async def wait_settled(self) -> EngineState:
        return await self.core.wait_settled()

    def _batcher(self) -> DynamicBatcher[Pending, ImageOutput]:
        if self.core.batcher is None:
            raise NotReady()
        return self.core.batcher

    def check_room(self, count: int = 1) -> None:
        if self.core.batcher is not None:
            self.core.batcher.check_room(count)

    def reserve(self, count: int) -> LocalSlots:
        return LocalSlots(self._batcher().reserve(count))

    async def alive(self, timeout_s: float) -> bool:
        return self.core.state is not EngineState.FAILED

    async def server_metrics(self) -> list[Any] | None:
        return None

    async def close(self, timeout_s: float) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.core.close(timeout_s)
