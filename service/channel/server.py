"""The engine's side of the channel: one connection per front-end, requests onto the
batcher, results back through the front-end's arena.

Each connection starts with `Hello` and the front-end's arena (its file descriptor, over
`SCM_RIGHTS`). Each `Submit` moves its images from the front-end's reservation to the
engine's queue count, copies their inputs out of the arena (a cancelled request's images
may still be in a batch when its block is reused), and queues them on the batcher with the
request's deadline; its one `Result` comes once every image is answered, skipped or failed.
A `Cancel` gives up the request's queued images, which the batcher then skips and counts,
as it does for a client that leaves in one process. A front-end that disconnects has its
reservations forgotten and its queued images given up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field

from service.channel import wire
from service.channel.admission import AdmissionCounts
from service.channel.arena import AttachedArena
from service.engine.batching import Completed
from service.engine.core import EngineCore
from service.engine_api import EngineState, ImageOutput, Pending
from service.errors import InferenceFailed, NotReady, ServiceError
from service.observability.aggregate import (
    FRONTEND_FAMILIES,
    SHARED_FAMILIES,
    Family,
    Retired,
    merge,
    plain,
)
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve.channel")
HELLO_TIMEOUT_S = 10.0
COLLECT_TIMEOUT_S = 2.0
CANCELLED = wire.ItemResult(status=499, code="client_closed_request", message="cancelled")


@dataclass(eq=False)
class Connection:
    slot: int
    pid: int
    arena: AttachedArena
    writer: asyncio.StreamWriter
    requests: dict[int, list[asyncio.Future[object]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    samples: list[Family] = field(default_factory=list)  # its last reported metrics
    collects: dict[int, asyncio.Future[list[Family]]] = field(default_factory=dict)

    def send(self, message: wire.ToFrontend) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.frame(message))


def _receive_hello(sock: socket.socket) -> tuple[wire.Hello, int]:
    """Blocking (in a thread): the first frame and the arena's descriptor with it. Reads
    exactly that frame: what follows is the stream's."""
    sock.settimeout(HELLO_TIMEOUT_S)
    try:
        header, fds, _flags, _address = socket.recv_fds(sock, wire.HEADER.size, 1)
        if len(fds) != 1 or len(header) != wire.HEADER.size:
            for fd in fds:
                os.close(fd)
            raise wire.ProtocolError("the first message must carry the arena")
        (length,) = wire.HEADER.unpack(header)
        body = b""
        while len(body) < min(length, wire.MAX_FRAME):
            chunk = sock.recv(length - len(body))
            if not chunk:
                break
            body += chunk
    finally:
        sock.settimeout(None)
    try:
        message = wire.decode_for_engine(body)
    except wire.ProtocolError:
        os.close(fds[0])
        raise
    if not isinstance(message, wire.Hello):
        os.close(fds[0])
        raise wire.ProtocolError(f"expected Hello, got {type(message).__name__}")
    return message, fds[0]


class EngineServer:
    """Serves the front-ends' connections for one `EngineCore`."""

    def __init__(
        self,
        core: EngineCore,
        metrics: ServiceMetrics,
        admission: AdmissionCounts,
        socket_path: str,
        expected_frontends: int,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.admission = admission
        self.socket_path = socket_path
        self.expected_frontends = expected_frontends
        self.connections: set[Connection] = set()
        self._ever_connected = 0
        self._all_connected = False  # readiness waits for every front-end at start
        self._retired = Retired()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._collect_ids = 0
        self._draining = False
        self._gone = asyncio.Event()  # set whenever a front-end disconnects

    # ------------------------------------------------------------ state

    @property
    def state(self) -> EngineState:
        state = self.core.state
        if state is EngineState.READY and not self._all_connected:
            return EngineState.STARTING
        return state

    def status(self) -> wire.EngineStatus:
        return wire.EngineStatus(
            str(self.state), self.core.info, len(self.connections), os.getpid()
        )

    def broadcast_status(self) -> None:
        status = self.status()
        for connection in self.connections:
            connection.send(status)

    def begin_drain(self) -> None:
        """SIGTERM: /metrics shows the server not ready; the front-ends drain themselves."""
        self._draining = True
        self.core.stop_admitting()

    async def wait_disconnected(self, timeout_s: float) -> bool:
        """Wait until no front-end is connected; False if `timeout_s` ran out."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.connections:
            self._gone.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), remaining)
        return True

    # ------------------------------------------------------------ connections

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(), name="engine-accept")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        for connection in list(self.connections):
            connection.writer.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._serve_connection(sock))
            task.add_done_callback(_log_failure)

    async def _serve_connection(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        try:
            hello, fd = await asyncio.to_thread(_receive_hello, sock)
            arena = AttachedArena.attach(fd, hello.arena_bytes)
        except (OSError, ValueError, wire.ProtocolError) as exc:
            log.error("refused a front-end connection: %s", exc)
            sock.close()
            return
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        connection = Connection(hello.slot, hello.pid, arena, writer)
        self.connections.add(connection)
        self._ever_connected += 1
        log.info("front-end %d (pid %d) connected", hello.slot, hello.pid)
        if self._ever_connected >= self.expected_frontends and not self._all_connected:
            self._all_connected = True
            self.broadcast_status()
        else:
            connection.send(self.status())
        try:
            while (body := await wire.read_frame(reader)) is not None:
                self._dispatch(connection, wire.decode_for_engine(body))
        except wire.ProtocolError as exc:
            log.error("front-end %d sent a bad message (%s): disconnecting it", hello.slot, exc)
        finally:
            await self._disconnected(connection)

    async def _disconnected(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self._gone.set()
        self.admission.forget(connection.slot)
        for futures in connection.requests.values():
            for future in futures:
                future.cancel()  # queued images are skipped, counted as abandoned
        if connection.tasks:
            await asyncio.gather(*connection.tasks, return_exceptions=True)
        self._retired.add(connection.samples)
        connection.writer.close()
        connection.arena.close()
        if not self._draining:
            log.warning("front-end %d (pid %d) disconnected", connection.slot, connection.pid)

    def _dispatch(self, connection: Connection, message: wire.ToEngine) -> None:
        if isinstance(message, wire.Submit):
            self._on_submit(connection, message)
        elif isinstance(message, wire.Cancel):
            for future in connection.requests.get(message.id, ()):
                future.cancel()
        elif isinstance(message, wire.Ping):
            connection.send(wire.Pong(message.id))
        elif isinstance(message, wire.Collect):
            task = asyncio.create_task(self._answer_collect(connection, message.id))
            connection.tasks.add(task)
            task.add_done_callback(connection.tasks.discard)
        elif isinstance(message, wire.Samples):
            connection.samples = message.families
            waiter = connection.collects.pop(message.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.families)

    # ------------------------------------------------------------ requests

    def _on_submit(self, connection: Connection, message: wire.Submit) -> None:
        """Queue the request's images at once (in order with any Cancel that follows it),
        then answer it from a task once they are done."""
        self.admission.received(connection.slot, len(message.items))
        try:
            futures = self._queue(connection, message)
        except ServiceError as error:
            connection.send(wire.Result(message.id, [_error_result(error)] * len(message.items)))
            return
        except Exception:
            log.exception("request %d from front-end %d failed", message.id, connection.slot)
            failed = _error_result(InferenceFailed())
            connection.send(wire.Result(message.id, [failed] * len(message.items)))
            return
        connection.requests[message.id] = futures  # type: ignore[assignment]
        task = asyncio.create_task(self._answer(connection, message, futures))
        connection.tasks.add(task)
        task.add_done_callback(connection.tasks.discard)

    def _queue(
        self, connection: Connection, message: wire.Submit
    ) -> list[asyncio.Future[Completed[ImageOutput]]]:
        batcher = self.core.batcher
        package = self.core.package
        if batcher is None or package is None:
            raise NotReady()
        crop = package.manifest.preprocessing.crop
        shape = (crop, crop, 3)
        items: list[Pending] = [
            connection.arena.read_pixels(item.offset, shape)
            if item.kind == wire.PIXELS
            else connection.arena.read_bytes(item.offset, item.length)
            for item in message.items
        ]
        with batcher.reserve(len(items)) as reservation:
            return [reservation.submit(item, message.deadline) for item in items]

    async def _answer(
        self,
        connection: Connection,
        message: wire.Submit,
        futures: list[asyncio.Future[Completed[ImageOutput]]],
    ) -> None:
        results = [CANCELLED] * len(futures)
        try:
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            results = [
                self._result(connection, item, message.outputs, outcome)
                for item, outcome in zip(message.items, outcomes, strict=True)
            ]
        finally:
            connection.requests.pop(message.id, None)
            connection.send(wire.Result(message.id, results))

    def _result(
        self,
        connection: Connection,
        item: wire.Item,
        outputs: int,
        outcome: Completed[ImageOutput] | BaseException,
    ) -> wire.ItemResult:
        if isinstance(outcome, asyncio.CancelledError):
            return CANCELLED
        if isinstance(outcome, ServiceError):
            return _error_result(outcome)
        if isinstance(outcome, BaseException):
            return _error_result(InferenceFailed())
        self._write_outputs(connection, item.out_offset, outputs, outcome.value)
        return wire.ItemResult(
            queued_s=outcome.queued_s,
            infer_s=outcome.value.infer_s,
            decode_s=outcome.value.decode_s,
            batch_size=outcome.batch_size,
        )

    @staticmethod
    def _write_outputs(
        connection: Connection, offset: int, wanted: int, output: ImageOutput
    ) -> None:
        if wanted & wire.WANT_LOGITS:
            offset += connection.arena.write_floats(offset, output.logits)
        if wanted & wire.WANT_EMBEDDING:
            connection.arena.write_floats(offset, output.embedding)

    # ------------------------------------------------------------ metrics

    def own_families(self) -> list[Family]:
        return plain(self.metrics.registry, None, exclude=FRONTEND_FAMILIES - SHARED_FAMILIES)

    async def collect(self) -> list[Family]:
        """Every process's families, merged: each live front-end is asked for its own
        (those that do not answer in time count with what they last sent)."""
        asks: list[Awaitable[list[Family]]] = []
        for connection in list(self.connections):
            self._collect_ids += 1
            waiter: asyncio.Future[list[Family]] = asyncio.get_running_loop().create_future()
            connection.collects[self._collect_ids] = waiter
            connection.send(wire.Collect(self._collect_ids))
            asks.append(_answer_or(waiter, connection.samples))
        fresh = await asyncio.gather(*asks)
        return merge(self.own_families(), self._retired.families, *fresh)

    async def _answer_collect(self, connection: Connection, message_id: int) -> None:
        connection.send(wire.Metrics(message_id, await self.collect()))


async def _answer_or(waiter: asyncio.Future[list[Family]], last: list[Family]) -> list[Family]:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(waiter, COLLECT_TIMEOUT_S)
    return last


def _error_result(error: ServiceError) -> wire.ItemResult:
    return wire.ItemResult(
        status=error.status, code=error.code, message=error.message, headers=dict(error.headers)
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("front-end connection failed", exc_info=task.exception())
