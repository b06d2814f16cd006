"""What the front-end may ask of the engine, wherever the engine runs.

The front-end (HTTP, gRPC, decoding) talks to the engine (ONNX Runtime, the batcher)
through one `EngineClient`: `service.engine.local.LocalEngine` when both live in one
process, `service.channel.client.RemoteEngine` when the engine is its own process.
Nothing above the client knows which; this module holds the types both sides speak and
imports nothing of either (no ONNX Runtime, no Starlette).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from service.model_package import ModelPackage, Precision

LOGITS = "logits"
EMBEDDING = "embedding"
ALL_OUTPUTS: frozenset[str] = frozenset({LOGITS, EMBEDDING})

# What an image is queued as: decoded pixels, or encoded bytes the engine decodes.
Pending = np.ndarray | bytes


class EngineState(StrEnum):
    STARTING = "starting"  # loading and warming up the model
    READY = "ready"
    FAILED = "failed"  # the model could not be loaded
    GONE = "gone"  # the engine process died: nothing will be answered any more


@dataclass
class Served:
    """What was actually loaded: may differ from what was asked (see `warnings`)."""

    precision: Precision
    providers: list[str]
    device: str
    warnings: list[str] = field(default_factory=list)
    providers_requested: list[str] = field(default_factory=list)
    gpu_fallback: str | None = None  # why a GPU that was asked for is not in use
    runtime: str = "onnxruntime"  # the inference runtime ("openvino": --runtime openvino)
    runtime_version: str = ""


@dataclass(frozen=True)
class DevicePolicy:
    """How batches are formed and where images are decoded, decided once the device is
    known (`service.engine.policy.device_policy`)."""

    device: str
    concurrent_batches: int
    partial_batches_while_busy: bool
    busy_batch_size: int  # the most images a batch that shares the engine takes
    decode_in_batch: bool  # True: images are queued encoded and decoded by the engine
    warmup_sizes: list[int]
    engine_ms_per_image: float | None = None  # a lone image's run, measured in warm-up
    lone_batches_alone: bool = True  # a batch that finds the engine idle takes every CPU


@dataclass(frozen=True)
class EngineInfo:
    """What the engine reports once loaded, for `/info`, the logs and the front-ends."""

    served: Served
    policy: DevicePolicy
    threads: dict[str, Any]  # `ThreadPlan.describe()`


@dataclass(frozen=True)
class ImageOutput:
    """One image's share of a batch run. An output the request did not ask for is an
    empty array."""

    logits: np.ndarray
    embedding: np.ndarray
    decode_s: float  # 0 when it was decoded before it was queued
    infer_s: float


class ItemDone(Protocol):
    """An image's result with where its time went (`batching.Completed` has this shape)."""

    @property
    def value(self) -> ImageOutput: ...
    @property
    def queued_s(self) -> float: ...
    @property
    def batch_size(self) -> int: ...


class Slots(Protocol):
    """Queue room held for one request's images while they are prepared; given back on
    exit for whatever was not submitted."""

    def submit(
        self, items: Sequence[Pending], deadline: float, outputs: frozenset[str]
    ) -> list[asyncio.Future[ItemDone]]: ...
    def __enter__(self) -> Slots: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class EngineClient(Protocol):
    """The engine as the front-end sees it."""

    @property
    def state(self) -> EngineState: ...
    @property
    def package(self) -> ModelPackage | None: ...
    @property
    def info(self) -> EngineInfo | None: ...  # None until loaded

    async def start(self) -> None:
        """Begin loading (local) or connect (remote); returns at once, `wait_settled`
        waits for the outcome."""

    async def wait_settled(self) -> EngineState:
        """Wait until the model has loaded or failed to."""

    def check_room(self, count: int = 1) -> None:
        """Raise `QueueFull` (429) at once unless `count` more images fit in the queue."""

    def reserve(self, count: int) -> Slots:
        """Hold `count` queue slots, or raise at once: `QueueFull` (429), `Draining` (503)."""

    async def alive(self, timeout_s: float) -> bool:
        """Whether the engine answers within `timeout_s` (liveness exercises the engine)."""

    async def server_metrics(self) -> list[Any] | None:
        """The whole server's metric families (plain form), when other processes hold some
        of them; None when this process's registry is the whole server."""

    async def close(self, timeout_s: float) -> None:
        """Stop taking work; what was submitted gets `timeout_s` to finish."""
