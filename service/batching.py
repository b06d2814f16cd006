"""A dynamic batcher: many concurrent callers, one engine that prefers batches.

One task owns the queue. Callers reserve capacity (`reserve`, which fails fast with
`QueueFull` when the queue is at `max_queue_size`), then `submit` items and await their
futures. The owner forms a batch when an engine slot is free and one of these holds:

- the queue holds a full batch: `max_batch_size` items, or `busy_batch_size` while
  another batch runs (a batch beside a running one shares the device, and on a CPU runs
  on an instance with a share of the cores, where a large batch would hold its images for
  several times as long as on all of them);
- the engine is idle: nothing runs and it has been free for `max_queue_delay`, or the
  queue holds as many items as the last batch had. A lone request never waits for
  company, while right after a batch of N the queue gets up to `max_queue_delay` to
  refill to N, so a steady load keeps its batch size instead of splitting (`_due`);
- while a batch runs (with `max_concurrent_batches` > 1), the oldest waiting item has
  waited `max_queue_delay` (unless `partial_batches_while_busy` is off: then only full
  batches start beside a running one).

With `run_alone` (a CPU engine with a session on every core beside its one-per-batch
instances), a batch that starts while nothing runs and the queue holds no more than
`busy_batch_size` items runs *alone*, on `run_alone`: nothing starts beside it until it
ends, because a batch beside it would take cores its threads spin on (both slow down, and
the two together serve less than either alone). A longer queue is work for several
instances at once: it goes out in batches of at most `busy_batch_size`, side by side.

Items whose future is already done (the caller gave up: deadline, disconnect) are
skipped before they reach the engine and counted. Each batch runs on an executor, off
the event loop, inside an exception boundary: a failing batch fails only its own items
and the loop lives on; `run_batch` may also return an exception in place of one item's
result to fail that item alone. The batcher knows nothing of images or HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Protocol, TypeVar

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
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def batch_finished(self, size: int, run_s: float, failed: bool) -> None:
        pass

    def skipped(self, reason: str) -> None:
        pass


@dataclass(frozen=True)
class Completed(Generic[R]):
    """An item's result with where its time went, for metrics and timing headers."""

    value: R
    queued_s: float
    run_s: float
    batch_size: int


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[Completed[R]]
    enqueued_at: float
    deadline: float | None


@dataclass
class _State:
    reserved: int = 0
    in_flight: int = 0
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
        executor: Executor,
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
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_concurrent_batches < 1:
            raise ValueError("batch size, queue size and concurrency must be positive")
        self._run_batch = run_batch
        self._run_alone = run_alone
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.busy_batch_size = min(busy_batch_size or max_batch_size, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self.partial_batches_while_busy = partial_batches_while_busy
        self._observer: BatchObserver = observer or NullObserver()
        self._clock = clock
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._state = _State()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._loop_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ callers

    @property
    def depth(self) -> int:
        """Images admitted and not yet on the engine (being prepared, or queued)."""
        return self._state.reserved + len(self._queue)

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
            taken = await self._next_batch()
            if taken is None:
                self._slots.release()
                return
            task = asyncio.create_task(self._run(*taken))
            self._state.running_batches.add(task)
            task.add_done_callback(self._state.running_batches.discard)

    async def _next_batch(self) -> tuple[list[_Pending[T, R]], bool] | None:
        """Wait until a batch is due, then take it with whether it runs alone; None once
        closing with nothing left. Nothing is due while a batch runs alone."""
        while True:
            self._drop_abandoned()
            timeout: float | None = None
            if self._queue and not self._state.alone:
                now = self._clock()
                if len(self._queue) >= self._batch_limit() or self._state.closing or self._due(now):
                    return self._take()
                timeout = self._time_until_due(now)
            elif not self._queue and self._state.closing and self._state.reserved == 0:
                return None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), None if timeout is None else max(timeout, 0.0)
                )

    def _batch_limit(self) -> int:
        """`busy_batch_size` beside a running batch, and always where batches may run
        alone (one that fits in it runs alone; a longer queue makes several)."""
        shares = self._state.in_flight or self._run_alone is not None
        return self.busy_batch_size if shares else self.max_batch_size

    def _due(self, now: float) -> bool:
        """Whether a partial batch should go now.

        While a batch runs (more than one may run at once), the oldest waiting item may
        wait `max_queue_delay` for company; with `partial_batches_while_busy` off, only a
        full batch may start beside a running one. With nothing running, the engine takes the
        queue at once if it has been free for `max_queue_delay`, or if the queue already
        holds as many items as the last batch had. Otherwise, right after a batch of N
        finished, it waits up to `max_queue_delay` for the queue to refill to N: that
        batch's clients are sending their next requests, and taking the first arrival
        alone would split a steady load into batches of 1 and N-1, again and again. A
        lone client (batches of 1) and an idle server are served at once.
        """
        state = self._state
        if state.in_flight:
            return (
                self.partial_batches_while_busy
                and now - self._queue[0].enqueued_at >= self.max_queue_delay_s
            )
        return (
            len(self._queue) >= state.last_batch_size
            or now - state.last_finished >= self.max_queue_delay_s
        )

    def _time_until_due(self, now: float) -> float | None:
        if self._state.in_flight:
            if not self.partial_batches_while_busy:
                return None  # only a full batch, or the running one finishing, wakes us
            return self._queue[0].enqueued_at + self.max_queue_delay_s - now
        return self._state.last_finished + self.max_queue_delay_s - now

    def _drop_abandoned(self) -> None:
        """Skip items nobody waits for any more, and fail those past their deadline."""
        if not self._queue:
            return
        now = self._clock()
        kept: collections.deque[_Pending[T, R]] = collections.deque()
        for pending in self._queue:
            if pending.future.done():
                self._observer.skipped("abandoned")
            elif pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(DeadlineExceeded())
                self._observer.skipped("deadline")
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._observer.queue_depth(self.depth)

    def _take(self) -> tuple[list[_Pending[T, R]], bool]:
        state = self._state
        alone = (
            self._run_alone is not None
            and not state.in_flight
            and len(self._queue) <= self.busy_batch_size
        )
        batch: list[_Pending[T, R]] = []
        limit = self._batch_limit()
        while self._queue and len(batch) < limit:
            batch.append(self._queue.popleft())
        state.in_flight += 1
        state.alone = alone
        self._observer.queue_depth(self.depth)
        return batch, alone

    async def _run(self, batch: list[_Pending[T, R]], alone: bool) -> None:
        started = self._clock()
        self._observer.batch_started(len(batch), [started - p.enqueued_at for p in batch])
        run_batch = self._run_alone if alone and self._run_alone else self._run_batch
        failed = True
        try:
            loop = asyncio.get_running_loop()
            items = [pending.item for pending in batch]
            results = await loop.run_in_executor(self._executor, run_batch, items)
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} items")
            run_s = self._clock() - started
            for pending, value in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(value, BaseException):  # this item alone failed
                    pending.future.set_exception(value)
                else:
                    completed = Completed(value, started - pending.enqueued_at, run_s, len(batch))
                    pending.future.set_result(completed)
            failed = False
        except Exception:
            log.exception("batch of %d failed; failing its requests", len(batch))
            self._fail(batch, InferenceFailed())
        except asyncio.CancelledError:
            self._fail(batch, Draining())
            raise
        finally:
            finished = self._clock()
            self._observer.batch_finished(len(batch), finished - started, failed)
            self._state.last_batch_size = len(batch)
            self._state.last_finished = finished
            self._state.in_flight -= 1
            if alone:
                self._state.alone = False
            self._slots.release()
            self._wakeup.set()

    @staticmethod
    def _fail(batch: list[_Pending[T, R]], error: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)
