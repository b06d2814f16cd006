"""`RemoteEngine`: the engine process as a front-end sees it, over the channel.

One Unix-socket connection to the engine, opened with the front-end's arena (its file
descriptor passed with the first message). A request's images are written into an arena
block, a `Submit` names their offsets, and the one `Result` for it says where each image's
outputs are (or why it failed) and frees the block. Admission is checked against the
server-wide count (service/channel/admission.py) before a body is read.

When the engine goes away every request in flight fails at once with 503
`engine_unavailable`, and the state turns `gone` (readiness and liveness fail; the
supervisor exits so the server is restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from service.channel import wire
from service.channel.admission import AdmissionCounts
from service.channel.arena import Arena
from service.config import Settings
from service.engine_api import (
    EMBEDDING,
    LOGITS,
    EngineInfo,
    EngineState,
    ImageOutput,
    ItemDone,
    Pending,
)
from service.errors import EngineUnavailable, ServiceError, TooBusy, error_from
from service.model_package import ModelPackage
from service.observability.aggregate import FRONTEND_FAMILIES, Family, plain
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve.channel")
CONNECT_TIMEOUT_S = 60.0  # the engine opens its socket before it loads the model
COLLECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Done:
    """An image's result (`engine_api.ItemDone`)."""

    value: ImageOutput
    queued_s: float
    batch_size: int


@dataclass
class _InFlight:
    block: int
    futures: list[asyncio.Future[ItemDone]]
    outputs: frozenset[str]
    out_offsets: list[int]
    cancelled: bool = False


@dataclass
class _Waiters:
    """Answers the front-end waits for, by message id."""

    pongs: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    metrics: dict[int, asyncio.Future[list[Family]]] = field(default_factory=dict)


def output_bytes(outputs: frozenset[str], num_classes: int, embedding_dim: int) -> int:
    return 4 * (num_classes * (LOGITS in outputs) + embedding_dim * (EMBEDDING in outputs))


def output_bits(outputs: frozenset[str]) -> int:
    return wire.WANT_LOGITS * (LOGITS in outputs) + wire.WANT_EMBEDDING * (EMBEDDING in outputs)


class RemoteSlots:
    """Queue room held in the server-wide count for one request's images."""

    def __init__(self, engine: RemoteEngine, count: int) -> None:
        self._engine = engine
        self._count = count

    def submit(
        self, items: Sequence[Pending], deadline: float, outputs: frozenset[str]
    ) -> list[asyncio.Future[ItemDone]]:
        if len(items) > self._count:
            raise RuntimeError("more items submitted than reserved")
        futures = self._engine._submit(items, deadline, outputs)
        if self._count > len(items):
            self._engine._admission.release(self._engine.slot, self._count - len(items))
        self._count = 0  # the engine moves the submitted ones to its own count
        return futures

    def __enter__(self) -> RemoteSlots:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._count:
            self._engine._admission.release(self._engine.slot, self._count)
            self._count = 0


class RemoteEngine:
    """`EngineClient` over the channel (one instance per front-end process)."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        socket_path: str,
        admission: AdmissionCounts,
        slot: int,
        arena_bytes: int,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.socket_path = socket_path
        self.slot = slot
        self._admission = admission
        self._arena = Arena(arena_bytes)
        self._state = EngineState.STARTING
        self._info: EngineInfo | None = None
        self._package: ModelPackage | None = None
        self._settled = asyncio.Event()
        self._connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._in_flight: dict[int, _InFlight] = {}
        self._waiters = _Waiters()
        self.frontends_connected = 0
        self.engine_pid: int | None = None
        self.on_gone: Callable[[], None] | None = None  # told once the engine has gone

    # ------------------------------------------------------------ EngineClient

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def package(self) -> ModelPackage | None:
        return self._package

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    async def start(self) -> None:
        self._package = ModelPackage.load(self.settings.model_dir)  # labels, preprocessing
        self._reader_task = asyncio.create_task(self._run(), name="engine-channel")

    async def wait_settled(self) -> EngineState:
        await self._settled.wait()
        return self._state

    def check_room(self, count: int = 1) -> None:
        self._admission.check(count)

    def reserve(self, count: int) -> RemoteSlots:
        if self._state is EngineState.GONE:
            raise EngineUnavailable()
        self._admission.reserve(self.slot, count)
        return RemoteSlots(self, count)

    async def alive(self, timeout_s: float) -> bool:
        """A round trip to the engine's event loop: a wedged engine fails this."""
        if self._state is EngineState.GONE or self._writer is None:
            return False
        message_id = next(self._ids)
        pong = asyncio.get_running_loop().create_future()
        self._waiters.pongs[message_id] = pong
        try:
            self._send(wire.Ping(message_id))
            await asyncio.wait_for(pong, timeout_s)
            return True
        except (TimeoutError, ConnectionError, EngineUnavailable):
            return False
        finally:
            self._waiters.pongs.pop(message_id, None)

    async def server_metrics(self, timeout_s: float = COLLECT_TIMEOUT_S) -> list[Family]:
        """The whole server's metric families (the engine merges every process's)."""
        message_id = next(self._ids)
        answer: asyncio.Future[list[Family]] = asyncio.get_running_loop().create_future()
        self._waiters.metrics[message_id] = answer
        try:
            self._send(wire.Collect(message_id))
            return await asyncio.wait_for(answer, timeout_s)
        finally:
            self._waiters.metrics.pop(message_id, None)

    async def close(self, timeout_s: float) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail_all(EngineUnavailable("the server is shutting down"))

    # ------------------------------------------------------------ requests

    def _submit(
        self, items: Sequence[Pending], deadline: float, outputs: frozenset[str]
    ) -> list[asyncio.Future[ItemDone]]:
        assert self._package is not None
        manifest = self._package.manifest
        per_output = output_bytes(outputs, manifest.num_classes, manifest.embedding_dim)
        inputs = [memoryview(item).cast("B") for item in items]  # type: ignore[arg-type]
        inputs_size = sum(view.nbytes for view in inputs)
        block = self._arena.allocate(inputs_size + per_output * len(items))
        if block is None:
            raise TooBusy("the front-end's shared memory is full; retry later")
        # The block: every image's input, then every image's outputs.
        offset, wire_items = block, []
        out_offsets = [block + inputs_size + per_output * index for index in range(len(items))]
        for item, view, out_offset in zip(items, inputs, out_offsets, strict=True):
            self._arena.write(offset, view)
            kind = wire.PIXELS if isinstance(item, np.ndarray) else wire.ENCODED
            wire_items.append(wire.Item(kind, offset, view.nbytes, out_offset))
            offset += view.nbytes
        message_id = next(self._ids)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ItemDone]] = [loop.create_future() for _ in items]
        request = _InFlight(block, futures, outputs, out_offsets)
        try:
            self._send(wire.Submit(message_id, deadline, output_bits(outputs), wire_items))
        except BaseException:
            self._arena.release(block)
            raise
        self._in_flight[message_id] = request
        for future in futures:
            future.add_done_callback(functools.partial(self._maybe_cancel, message_id))
        return futures

    def _maybe_cancel(self, message_id: int, future: asyncio.Future[ItemDone]) -> None:
        """The caller gave up on an image (deadline, disconnect): tell the engine once, so
        its queued images are skipped. The block stays held until the engine's Result."""
        request = self._in_flight.get(message_id)
        if request is None or request.cancelled or not future.cancelled():
            return
        request.cancelled = True
        with contextlib.suppress(ConnectionError, EngineUnavailable):
            self._send(wire.Cancel(message_id))

    def _on_result(self, message: wire.Result) -> None:
        request = self._in_flight.pop(message.id, None)
        if request is None:
            return
        assert self._package is not None
        manifest = self._package.manifest
        for future, item, out_offset in zip(
            request.futures, message.items, request.out_offsets, strict=True
        ):
            if future.done():
                continue
            if item.status:
                future.set_exception(
                    error_from(item.code, item.message, item.status, dict(item.headers))
                )
                continue
            offset = out_offset
            logits = embedding = np.empty(0, dtype=np.float32)
            if LOGITS in request.outputs:
                logits = self._arena.floats(offset, manifest.num_classes).copy()
                offset += logits.nbytes
            if EMBEDDING in request.outputs:
                embedding = self._arena.floats(offset, manifest.embedding_dim).copy()
            output = ImageOutput(logits, embedding, item.decode_s, item.infer_s)
            future.set_result(Done(output, item.queued_s, item.batch_size))
        self._arena.release(request.block)

    def _fail_all(self, error: ServiceError) -> None:
        for request in self._in_flight.values():
            for future in request.futures:
                if not future.done():
                    future.set_exception(error)
        self._in_flight.clear()
        self._arena.release_all()
        waiters: list[asyncio.Future[Any]] = [
            *self._waiters.pongs.values(),
            *self._waiters.metrics.values(),
        ]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(EngineUnavailable())

    # ------------------------------------------------------------ the connection

    def _send(self, message: wire.ToEngine) -> None:
        if self._writer is None or self._state is EngineState.GONE:
            raise EngineUnavailable()
        self._writer.write(wire.frame(message))

    async def _run(self) -> None:
        try:
            reader = await self._connect()
            while (body := await wire.read_frame(reader)) is not None:
                self._dispatch(wire.decode_for_frontend(body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a protocol error or a failed connect: the engine is lost
            log.error("engine channel failed: %s: %s", type(exc).__name__, exc)
        self._engine_gone()

    def _engine_gone(self) -> None:
        if self._state is not EngineState.GONE:
            log.error("the engine process has gone: failing every request in flight")
        self._state = EngineState.GONE
        self._settled.set()
        self.metrics.ready.set(0)
        self._fail_all(EngineUnavailable())
        if self.on_gone is not None:
            self.on_gone()

    async def _connect(self) -> asyncio.StreamReader:
        """Connect (the engine may still be starting), send Hello with the arena's fd."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        hello = wire.frame(wire.Hello(self.slot, os.getpid(), self._arena.size))
        socket.send_fds(sock, [hello], [self._arena.fd])
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._connected.set()
        return reader

    def _dispatch(self, message: wire.ToFrontend) -> None:
        if isinstance(message, wire.Result):
            self._on_result(message)
        elif isinstance(message, wire.EngineStatus):
            self._on_status(message)
        elif isinstance(message, wire.Pong):
            pong = self._waiters.pongs.get(message.id)
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif isinstance(message, wire.Metrics):
            answer = self._waiters.metrics.get(message.id)
            if answer is not None and not answer.done():
                answer.set_result(message.families)
        elif isinstance(message, wire.Collect):
            families = plain(self.metrics.registry, FRONTEND_FAMILIES)
            self._send(wire.Samples(message.id, families))

    def _on_status(self, message: wire.EngineStatus) -> None:
        self._info = message.info if message.info is not None else self._info
        self.frontends_connected = message.frontends
        self.engine_pid = message.pid
        state = EngineState(message.state)
        if state is not self._state:
            log.info("engine: %s", state)
        self._state = state
        if state in (EngineState.READY, EngineState.FAILED):
            self._settled.set()
