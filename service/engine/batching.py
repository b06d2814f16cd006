"""A dynamic batcher: many concurrent callers, one engine that prefers batches.

One task owns the queue. Callers reserve capacity (`reserve`, which fails fast with
`QueueFull` when the queue is at `max_queue_size`), then `submit` items and await their
futures. The owner forms batches by the rules of `service/engine/batch_rules.py` (when a batch
is due, how large, whether it runs alone on `run_alone`) and runs each on one of its
threads, one per concurrent batch. With every thread busy, a full batch is handed over
early: it waits in the threads' queue (and counts in the queue's depth) and the first
thread to free starts it, without a hop through the event loop, which, busy with HTTP,
left each thread idle a while after every batch (5% of two CPUs at saturation).

Items nobody waits for any more (the caller gave up: deadline, disconnect) are skipped
when their batch is formed and again when it starts, and counted. Each batch runs inside
an exception boundary: a failing batch fails only its own items and the loop lives on;
`run_batch` may also return an exception in place of one item's result to fail that item
alone. The batcher knows nothing of images or HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from service.engine.batch_rules import BatchRules, QueueView
from service.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("resnet_serve.batching")


class BatchObserver(Protocol):
    """Where the batcher reports what it does (Prometheus in production, lists in tests)."""

    def queue_depth(self, depth: int) -> None: ...
    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None: ...
    def batch_finished(self, size: int, run_s: float, failed: bool) -> None: ...
    def skipped(self, reason: str) -> None: ...


class NullObserver:
    def queue_depth(self, depth: int) -> None: ...
    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None: ...
    def batch_finished(self, size: int, run_s: float, failed: bool) -> None: ...
    def skipped(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Completed(Generic[R]):
    """An item's result with where its time went, for metrics and timing headers."""

    value: R
    queued_s: float
    run_s: float
    batch_size: int


@dataclass(eq=False)  # compared by identity: items may be arrays
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[Completed[R]]
    enqueued_at: float
    deadline: float | None

    def wanted(self, now: float) -> bool:
        """Someone still waits for it, within its deadline. Safe on a batch's thread too:
        `done()` only reads the future's state (a cancellation racing it runs the item,
        as it would have a moment later)."""
        return not self.future.done() and (self.deadline is None or now < self.deadline)


@dataclass
class _Batch(Generic[T, R]):
    pendings: list[_Pending[T, R]]
    alone: bool
    handed_early: bool  # taken while every thread was busy: it starts when one frees
    announced: bool = False  # `_started` has run for it
    started: float | None = None  # set on the batch's thread when it starts, with:
    ran: list[_Pending[T, R]] = field(default_factory=list)  # the items still wanted then


@dataclass
class _State:
    reserved: int = 0
    in_flight: int = 0  # batches taken from the queue and not finished
    handed_early: int = 0  # images in a batch handed over early, not started
    closing: bool = False
    last_batch_size: int = 0
    last_finished: float = float("-inf")
    alone: bool = False  # a batch runs alone: nothing may start beside it
    running_batches: set[asyncio.Task[None]] = field(default_factory=set)


class Reservation(Generic[T, R]):
    """Queue slots held for one request's items while they are being prepared."""

    def __init__(self, batcher: DynamicBatcher[T, R], count: int) -> None:
        self._batcher = batcher
        self._remaining = count

    def submit(self, item: T, deadline: float | None = None) -> asyncio.Future[Completed[R]]:
        if self._remaining <= 0:
            raise RuntimeError("more items submitted than reserved")
        self._remaining -= 1
        return self._batcher._enqueue(item, deadline)

    def release(self) -> None:
        """Give back the slots not used (the request failed before submitting them)."""
        if self._remaining:
            self._batcher._unreserve(self._remaining)
            self._remaining = 0

    def __enter__(self) -> Reservation[T, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


RunBatch = Callable[[list[T]], Sequence[R | BaseException]]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: RunBatch[T, R],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        partial_batches_while_busy: bool = True,
        busy_batch_size: int | None = None,
        run_alone: RunBatch[T, R] | None = None,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        thread_name_prefix: str = "batch",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_concurrent_batches < 1:
            raise ValueError("batch size, queue size and concurrency must be positive")
        self._run_batch = run_batch
        self._run_alone = run_alone
        # One thread per concurrent batch; a batch handed over early waits in its queue.
        self._threads = ThreadPoolExecutor(max_concurrent_batches, thread_name_prefix)
        self.rules = BatchRules(
            max_batch_size=max_batch_size,
            busy_batch_size=min(busy_batch_size or max_batch_size, max_batch_size),
            max_queue_delay_s=max_queue_delay_s,
            max_concurrent_batches=max_concurrent_batches,
            partial_batches_while_busy=partial_batches_while_busy,
            may_run_alone=run_alone is not None,
        )
        self.max_queue_size = max_queue_size
        self._observer: BatchObserver = observer or NullObserver()
        self._clock = clock
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._state = _State()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches + 1)  # + one handed early
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ callers

    @property
    def depth(self) -> int:
        """Images admitted and not yet on the engine (being prepared, queued, or handed
        over early)."""
        return self._state.reserved + len(self._queue) + self._state.handed_early

    @property
    def in_flight(self) -> int:
        return self._state.in_flight

    def check_room(self, count: int = 1) -> None:
        """Raise `QueueFull` (429) at once unless `count` more images fit in the queue."""
        if self.depth + count > self.max_queue_size:
            raise QueueFull(
                f"the queue holds {self.depth} of {self.max_queue_size} images; retry later",
                headers={"Retry-After": "1"},
            )

    def reserve(self, count: int) -> Reservation[T, R]:
        """Hold `count` queue slots, or raise at once: `QueueFull` (429) or `Draining` (503)."""
        if self._state.closing:
            raise Draining()
        self.check_room(count)
        self._state.reserved += count
        self._observer.queue_depth(self.depth)
        return Reservation(self, count)

    def _unreserve(self, count: int) -> None:
        self._state.reserved -= count
        self._observer.queue_depth(self.depth)
        self._wakeup.set()  # a close() may be waiting for the last reservation to go

    def _enqueue(self, item: T, deadline: float | None) -> asyncio.Future[Completed[R]]:
        future: asyncio.Future[Completed[R]] = asyncio.get_running_loop().create_future()
        self._state.reserved -= 1
        if self._state.closing and (self._loop_task is None or self._loop_task.done()):
            # Nobody will read the queue any more (a drain gave up): fail now, not at the
            # caller's deadline.
            future.set_exception(Draining())
            self._observer.queue_depth(self.depth)
            return future
        self._queue.append(_Pending(item, future, self._clock(), deadline))
        self._wakeup.set()
        return future

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._dispatch_loop(), name="batcher")

    async def close(self, timeout_s: float) -> None:
        """Stop admitting work, run everything already queued, wait for running batches.

        Items still queued or running after `timeout_s` fail with `Draining`.
        """
        self._state.closing = True
        self._wakeup.set()
        try:
            await self._drain(timeout_s)
        finally:
            # A batch still running keeps its thread until the engine returns.
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _drain(self, timeout_s: float) -> None:
        if self._loop_task is None:
            self._fail_queued(Draining())
            return
        try:
            async with asyncio.timeout(timeout_s):  # one deadline for the queue and the engine
                await asyncio.shield(self._loop_task)
                running = set(self._state.running_batches)
                if running:
                    await asyncio.gather(*running)
        except TimeoutError:
            log.error("batcher: drain timed out after %.1f s; failing what is left", timeout_s)
            self._loop_task.cancel()
            for task in self._state.running_batches:
                task.cancel()
            self._fail_queued(Draining())

    def _fail_queued(self, error: Exception) -> None:
        self._fail(list(self._queue), error)
        self._queue.clear()
        self._observer.queue_depth(self.depth)

    # ------------------------------------------------------------ the owner

    async def _dispatch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            if batch is None:
                self._slots.release()
                return
            task = asyncio.create_task(self._run(batch))
            self._state.running_batches.add(task)
            task.add_done_callback(self._state.running_batches.discard)

    async def _next_batch(self) -> _Batch[T, R] | None:
        """Wait until a batch is due, then take it; None once closing with nothing left.
        Nothing is due while a batch runs alone."""
        while True:
            self._drop_abandoned()
            timeout: float | None = None
            if self._queue and not self._state.alone:
                now = self._clock()
                view = self._view()
                if self._state.closing or self.rules.due(view, now):
                    return self._take()
                timeout = self.rules.time_until_due(view, now)
            elif not self._queue and self._state.closing and self._state.reserved == 0:
                return None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), None if timeout is None else max(timeout, 0.0)
                )

    def _view(self) -> QueueView:
        state = self._state
        oldest = self._queue[0].enqueued_at if self._queue else 0.0
        return QueueView(
            len(self._queue), oldest, state.in_flight, state.last_batch_size, state.last_finished
        )

    def _drop_abandoned(self) -> None:
        """Skip items nobody waits for any more, and fail those past their deadline."""
        if not self._queue:
            return
        now = self._clock()
        kept: collections.deque[_Pending[T, R]] = collections.deque()
        for pending in self._queue:
            if pending.wanted(now):
                kept.append(pending)
            else:
                self._skip(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._observer.queue_depth(self.depth)

    def _skip(self, pending: _Pending[T, R]) -> None:
        if pending.future.done():
            self._observer.skipped("abandoned")
        else:
            pending.future.set_exception(DeadlineExceeded())
            self._observer.skipped("deadline")

    def _take(self) -> _Batch[T, R]:
        state = self._state
        alone = self.rules.runs_alone(len(self._queue), state.in_flight)
        pendings: list[_Pending[T, R]] = []
        limit = self.rules.limit(state.in_flight)
        while self._queue and len(pendings) < limit:
            pendings.append(self._queue.popleft())
        batch = _Batch(pendings, alone, handed_early=self.rules.engine_full(state.in_flight))
        if batch.handed_early:
            state.handed_early += len(pendings)
        state.in_flight += 1
        state.alone = alone
        self._observer.queue_depth(self.depth)
        return batch

    async def _run(self, batch: _Batch[T, R]) -> None:
        loop = asyncio.get_running_loop()
        run_batch = self._run_alone if batch.alone and self._run_alone else self._run_batch

        def on_batch_thread() -> Sequence[R | BaseException]:
            batch.started = now = self._clock()
            # Skipped here, not only when queued: a batch handed over early waited.
            batch.ran = [pending for pending in batch.pendings if pending.wanted(now)]
            if batch.handed_early or len(batch.ran) < len(batch.pendings):
                # The queue depth and the skipped images' callers must know now; else
                # the loop hears of the start with the finish (one wake-up a batch less).
                loop.call_soon_threadsafe(self._started, batch)
            return run_batch([pending.item for pending in batch.ran]) if batch.ran else []

        failed = True
        try:
            results = await loop.run_in_executor(self._threads, on_batch_thread)
            self._started(batch)  # unless the thread already had the loop do it
            size = len(batch.ran)
            if len(results) != size:
                raise RuntimeError(f"engine returned {len(results)} results for {size} items")
            assert batch.started is not None
            started = batch.started
            run_s = self._clock() - started
            for pending, value in zip(batch.ran, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(value, BaseException):  # this item alone failed
                    pending.future.set_exception(value)
                else:
                    queued_s = started - pending.enqueued_at
                    pending.future.set_result(Completed(value, queued_s, run_s, size))
            failed = False
        except Exception:
            log.exception("batch of %d failed; failing its requests", len(batch.pendings))
            self._fail(batch.pendings, InferenceFailed())
        except asyncio.CancelledError:
            self._fail(batch.pendings, Draining())
            raise
        finally:
            if batch.started is not None:
                self._started(batch)
            self._no_longer_waiting(batch)
            finished = self._clock()
            if batch.started is not None and batch.ran:  # else the engine never ran it
                self._observer.batch_finished(len(batch.ran), finished - batch.started, failed)
            self._state.last_batch_size = len(batch.ran)
            self._state.last_finished = finished
            self._state.in_flight -= 1
            if batch.alone:
                self._state.alone = False
            self._slots.release()
            self._wakeup.set()

    def _started(self, batch: _Batch[T, R]) -> None:
        """On the event loop, once a thread has started `batch`."""
        assert batch.started is not None
        if batch.announced:
            return
        batch.announced = True
        ran = {id(pending) for pending in batch.ran}
        for pending in batch.pendings:
            if id(pending) not in ran:
                self._skip(pending)
        if batch.ran:
            waits = [batch.started - pending.enqueued_at for pending in batch.ran]
            self._observer.batch_started(len(batch.ran), waits)
        self._no_longer_waiting(batch)

    def _no_longer_waiting(self, batch: _Batch[T, R]) -> None:
        if batch.handed_early:
            batch.handed_early = False
            self._state.handed_early -= len(batch.pendings)
            self._observer.queue_depth(self.depth)

    @staticmethod
    def _fail(pendings: list[_Pending[T, R]], error: Exception) -> None:
        for pending in pendings:
            if not pending.future.done():
                pending.future.set_exception(error)
