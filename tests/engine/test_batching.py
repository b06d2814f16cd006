"""DynamicBatcher against a fake engine (gated, on the batcher's threads) and a fake clock.

No test sleeps or measures time: the engine records each batch and blocks on a gate the
test opens, the batcher's clock is advanced by hand, and every wait that could hang is
bounded (`asyncio.wait_for`, or a bounded wait on a threading condition).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from service.engine.batching import BatchObserver, Completed, DynamicBatcher
from service.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull

WAIT_S = 5.0  # upper bound on any wait; a passing test never gets near it

T = TypeVar("T")


class FakeClock:
    """The batcher's clock: seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEngine:
    """`run_batch` for the batcher: records every batch, optionally waits on a gate.

    `respond` turns a batch into its results (default: each item times 10); it may raise.
    """

    def __init__(self, respond: Callable[[list[int]], Sequence[int]] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self._respond = respond or (lambda items: [item * 10 for item in items])
        self._changed = threading.Condition()

    def hold(self) -> None:
        """From now on each batch blocks, once recorded, until `release`."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def __call__(self, items: list[int]) -> Sequence[int]:
        with self._changed:
            self.batches.append(list(items))
            self._changed.notify_all()
        if not self.gate.wait(WAIT_S * 2):
            raise RuntimeError("the test never released the engine")
        return self._respond(items)

    def _wait_batches(self, count: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.batches) >= count, WAIT_S)

    async def wait_started(self, count: int) -> None:
        """Wait (bounded) until the engine has been handed `count` batches in all."""
        if not await asyncio.to_thread(self._wait_batches, count):
            pytest.fail(f"the engine got {self.batches}, expected at least {count} batches")


@dataclass
class RecordingObserver:
    depths: list[int] = field(default_factory=list)
    started: list[tuple[int, list[float]]] = field(default_factory=list)
    finished: list[tuple[int, float, bool]] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self.started.append((size, list(queue_waits_s)))

    def batch_finished(self, size: int, run_s: float, failed: bool) -> None:
        self.finished.append((size, run_s, failed))

    def skipped(self, reason: str) -> None:
        self.skips.append(reason)

    @property
    def batch_sizes(self) -> list[int]:
        return [size for size, _ in self.started]


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine()
    yield fake
    fake.release()  # never leave a pool thread blocked, whatever the test did


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


def make_batcher(
    engine: FakeEngine,
    clock: FakeClock,
    observer: BatchObserver | None = None,
    *,
    max_batch_size: int = 4,
    max_queue_delay_s: float = 0.0,
    max_queue_size: int = 100,
    max_concurrent_batches: int = 1,
    partial_batches_while_busy: bool = True,
    busy_batch_size: int | None = None,
) -> DynamicBatcher[int, int]:
    return DynamicBatcher(
        engine,
        max_batch_size=max_batch_size,
        max_queue_delay_s=max_queue_delay_s,
        max_queue_size=max_queue_size,
        max_concurrent_batches=max_concurrent_batches,
        partial_batches_while_busy=partial_batches_while_busy,
        busy_batch_size=busy_batch_size,
        observer=observer,
        clock=clock,
    )


async def settle(rounds: int = 20) -> None:
    """Let every ready task on the loop run (yields to the loop; no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT_S)


async def results(futures: Sequence[asyncio.Future[Completed[int]]]) -> list[Completed[int]]:
    return await bounded(asyncio.gather(*futures))


# ---------------------------------------------------------------- dispatch


def test_idle_engine_takes_a_lone_item_without_waiting_for_the_delay(
    engine: FakeEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, max_queue_delay_s=1000.0)
        batcher.start()
        with batcher.reserve(1) as slots:
            future = slots.submit(7)
        done = await bounded(future)
        assert done == Completed(value=70, queued_s=0.0, run_s=0.0, batch_size=1)
        assert engine.batches == [[7]]
        assert clock.now == 1000.0  # nothing advanced the clock: the delay never applied
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_items_queued_behind_a_busy_engine_form_full_batches_in_order(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=4, max_concurrent_batches=1)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(6)
        first = slots.submit(0)
        await engine.wait_started(1)
        queued = [slots.submit(item) for item in range(1, 6)]
        await settle()
        # The full batch [1-4] is handed to the engine threads early: it waits there for
        # the one slot (the engine has not seen it) and still counts as queued.
        assert engine.batches == [[0]]
        assert batcher.depth == 5
        assert batcher.in_flight == 2

        clock.advance(2.0)  # the queued items wait 2 s (fake) for the engine
        engine.release()
        done = await results([first, *queued])

        assert engine.batches == [[0], [1, 2, 3, 4], [5]]
        assert [completed.value for completed in done] == [0, 10, 20, 30, 40, 50]
        assert [completed.batch_size for completed in done] == [1, 4, 4, 4, 4, 1]
        assert [completed.queued_s for completed in done] == [0.0] + [2.0] * 5
        # A batch's start is reported with its finish unless it waited as an early
        # hand-over (the [1, 2, 3, 4] here): one wake-up of the loop a batch less.
        assert sorted(observer.batch_sizes) == [1, 1, 4]
        assert sorted(observer.started) == [(1, [0.0]), (1, [2.0]), (4, [2.0] * 4)]
        assert [(size, failed) for size, _, failed in observer.finished] == [
            (1, False),
            (4, False),
            (1, False),
        ]
        # reserve(6) → 6 admitted; each batch taken lowers the depth by its size, the one
        # handed over early once it starts.
        assert observer.depths == [6, 5, 5, 1, 0]
        assert batcher.depth == 0
        assert observer.skips == []
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_run_time_is_measured_on_the_batcher_clock(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer)
        batcher.start()
        engine.hold()
        with batcher.reserve(1) as slots:
            future = slots.submit(3)
        await engine.wait_started(1)
        clock.advance(0.75)  # the engine "takes" 0.75 s
        engine.release()
        done = await bounded(future)
        assert done == Completed(value=30, queued_s=0.0, run_s=0.75, batch_size=1)
        assert observer.finished == [(1, 0.75, False)]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_partial_batch_waits_while_a_batch_runs_and_a_full_one_goes_at_once(
    engine: FakeEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(
            engine,
            clock,
            max_batch_size=4,
            max_queue_delay_s=1000.0,
            max_concurrent_batches=2,
        )
        batcher.start()
        engine.hold()
        slots = batcher.reserve(5)
        first = slots.submit(0)
        await engine.wait_started(1)

        partial = [slots.submit(item) for item in (1, 2, 3)]
        await settle()
        # A free engine slot, but 3 < max_batch_size, the engine is not idle and no
        # (fake) time has passed: the batcher waits for company.
        assert engine.batches == [[0]]
        assert batcher.depth == 4  # 3 queued + 1 still reserved

        fourth = slots.submit(4)
        await engine.wait_started(2)  # the full batch goes while the first still runs
        assert engine.batches == [[0], [1, 2, 3, 4]]
        assert batcher.in_flight == 2

        engine.release()
        done = await results([first, *partial, fourth])
        assert [completed.value for completed in done] == [0, 10, 20, 30, 40]
        assert [completed.batch_size for completed in done] == [1, 4, 4, 4, 4]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_partial_batch_goes_once_its_oldest_item_has_waited_the_delay(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(
            engine,
            clock,
            observer,
            max_batch_size=8,
            max_queue_delay_s=10.0,
            max_concurrent_batches=2,
        )
        batcher.start()
        engine.hold()
        slots = batcher.reserve(5)
        first = slots.submit(0)
        await engine.wait_started(1)

        older = [slots.submit(1), slots.submit(2)]
        await settle()
        assert engine.batches == [[0]]

        clock.advance(9.0)
        third = slots.submit(3)  # wakes the batcher: the oldest has waited 9 s < 10 s
        await settle()
        assert engine.batches == [[0]]

        clock.advance(1.0)
        fourth = slots.submit(4)  # the oldest has now waited 10 s; this one 0 s
        await engine.wait_started(2)
        assert engine.batches == [[0], [1, 2, 3, 4]]

        engine.release()
        done = await results([first, *older, third, fourth])
        assert (4, [10.0, 10.0, 1.0, 0.0]) in observer.started
        assert [completed.value for completed in done] == [0, 10, 20, 30, 40]
        assert [completed.queued_s for completed in done] == [0.0, 10.0, 10.0, 1.0, 0.0]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


# ---------------------------------------------------------------- admission


def test_reserve_counts_toward_depth_and_refuses_beyond_max_queue_size(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        # Never started: whatever is submitted stays queued, so depth is exact.
        batcher = make_batcher(engine, clock, observer, max_queue_size=4)
        held = batcher.reserve(3)
        assert batcher.depth == 3

        with pytest.raises(QueueFull) as refused:
            batcher.reserve(2)
        assert refused.value.status == 429
        assert refused.value.code == "queue_full"
        assert refused.value.headers.get("Retry-After") == "1"
        assert batcher.depth == 3  # a refused reservation holds nothing

        with batcher.reserve(1) as last:
            assert batcher.depth == 4
            with pytest.raises(QueueFull):
                batcher.reserve(1)
            assert isinstance(last.submit(99), asyncio.Future)
            with pytest.raises(RuntimeError, match="more items submitted than reserved"):
                last.submit(100)
        assert batcher.depth == 4  # the submitted item is queued: it still counts

        queued = held.submit(10)
        assert batcher.depth == 4
        held.release()  # gives back the 2 unused slots
        assert batcher.depth == 2
        held.release()  # idempotent
        assert batcher.depth == 2

        depth_inside: list[int] = []

        def failing_request() -> None:
            with batcher.reserve(2):
                depth_inside.append(batcher.depth)
                raise ValueError("boom")  # a failing request returns its slots on exit

        with pytest.raises(ValueError, match="boom"):
            failing_request()
        assert depth_inside == [4]
        assert batcher.depth == 2

        assert observer.depths == [3, 4, 2, 4, 2]
        assert engine.batches == []

        await bounded(batcher.close(WAIT_S))  # never started: queued items fail at once
        with pytest.raises(Draining):
            await bounded(queued)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("batch_size", "queue_size", "concurrency"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)]
)
def test_invalid_limits_are_refused(
    engine: FakeEngine,
    batch_size: int,
    queue_size: int,
    concurrency: int,
) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        DynamicBatcher(
            engine,
            max_batch_size=batch_size,
            max_queue_delay_s=0.0,
            max_queue_size=queue_size,
            max_concurrent_batches=concurrency,
        )


# ---------------------------------------------------------------- skipping


def test_a_future_cancelled_while_queued_never_reaches_the_engine(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=4)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(4)
        first = slots.submit(0)
        await engine.wait_started(1)
        kept_a, abandoned, kept_b = slots.submit(1), slots.submit(2), slots.submit(3)
        assert abandoned.cancel()
        await settle()

        engine.release()
        done = await results([first, kept_a, kept_b])
        assert [completed.value for completed in done] == [0, 10, 30]
        assert engine.batches == [[0], [1, 3]]
        assert observer.skips == ["abandoned"]
        assert observer.batch_sizes == [1, 2]
        assert abandoned.cancelled()
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_full_batch_handed_over_early_starts_while_the_event_loop_is_blocked(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    """The point of handing over early: a freed engine thread starts the next batch
    itself, without waiting for the event loop (here blocked outright)."""

    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=2)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(5)
        futures = [slots.submit(0)]
        await engine.wait_started(1)
        futures += [slots.submit(item) for item in (1, 2, 3, 4)]
        await settle()
        assert batcher.in_flight == 2  # [0] runs, [1, 2] is handed over early
        assert batcher.depth == 4
        assert observer.depths[-1] == 4

        clock.advance(1.0)
        engine.release()
        # Block the event loop: the early batch must still reach the engine.
        assert engine._wait_batches(2), f"the engine got only {engine.batches}"
        assert engine.batches[:2] == [[0], [1, 2]]

        done = await results(futures)
        assert [completed.value for completed in done] == [0, 10, 20, 30, 40]
        assert engine.batches == [[0], [1, 2], [3, 4]]
        # The early batch's queue wait runs to its real start, after the clock moved.
        assert (2, [1.0, 1.0]) in observer.started
        assert batcher.depth == 0
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


@pytest.mark.parametrize("reason", ["deadline", "abandoned"])
def test_an_item_given_up_while_handed_over_early_is_skipped_when_its_batch_starts(
    engine: FakeEngine, clock: FakeClock, observer: RecordingObserver, reason: str
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=1)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(3)
        first = slots.submit(0)
        await engine.wait_started(1)
        given_up = slots.submit(1, deadline=clock.now + 1.0)
        await settle()
        assert batcher.in_flight == 2  # [1] is handed over early
        last = slots.submit(2)
        if reason == "deadline":
            clock.advance(2.0)
        else:
            assert given_up.cancel()
        await settle()

        engine.release()
        assert [c.value for c in await results([first, last])] == [0, 20]
        assert engine.batches == [[0], [2]]
        if reason == "deadline":
            with pytest.raises(DeadlineExceeded):
                await bounded(given_up)
        assert observer.skips == [reason]
        assert observer.batch_sizes == [1, 1]
        assert batcher.depth == 0
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_with_every_slot_busy_a_partial_batch_stays_queued_and_may_be_skipped(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=4, max_concurrent_batches=2)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(5)
        running = [slots.submit(0), slots.submit(1)]
        await engine.wait_started(1)
        running.append(slots.submit(2))  # the second slot takes it at once
        await engine.wait_started(2)
        assert batcher.in_flight == 2
        queued, abandoned = slots.submit(3), slots.submit(4)
        clock.advance(1.0)  # long past the delay: still not handed over, only 2 of 4
        await settle()
        assert batcher.in_flight == 2
        assert abandoned.cancel()
        await settle()

        engine.release()
        assert [c.value for c in await results([*running, queued])] == [0, 10, 20, 30]
        assert engine.batches == [[0, 1], [2], [3]]
        assert observer.skips == ["abandoned"]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_an_item_past_its_deadline_fails_without_reaching_the_engine(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=4)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(4)
        first = slots.submit(0)
        await engine.wait_started(1)
        late = slots.submit(1, deadline=clock() + 5.0)
        on_the_dot = slots.submit(2, deadline=clock() + 10.0)
        in_time = slots.submit(3, deadline=clock() + 10.5)
        clock.advance(10.0)

        engine.release()
        done = await results([first, in_time])
        assert [completed.value for completed in done] == [0, 30]
        for expired in (late, on_the_dot):
            with pytest.raises(DeadlineExceeded) as failure:
                await bounded(expired)
            assert failure.value.status == 504
        assert engine.batches == [[0], [3]]
        assert observer.skips == ["deadline", "deadline"]
        assert observer.batch_sizes == [1, 1]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


# ---------------------------------------------------------------- failures


def _poisoned(items: list[int]) -> Sequence[int]:
    if 666 in items:
        raise RuntimeError("the engine fell over")
    return [item * 10 for item in items]


def _short_handed(items: list[int]) -> Sequence[int]:
    results = [item * 10 for item in items]
    return results[:-1] if 666 in items else results


@pytest.mark.parametrize("respond", [_poisoned, _short_handed], ids=["raises", "wrong_count"])
def test_a_failing_batch_fails_only_its_own_items(
    respond: Callable[[list[int]], Sequence[int]],
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    engine = FakeEngine(respond)

    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=3)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(5)
        first = slots.submit(0)
        await engine.wait_started(1)
        doomed = [slots.submit(666), slots.submit(1), slots.submit(2)]
        after = slots.submit(3)
        await settle()

        engine.release()
        assert (await bounded(first)).value == 0
        for future in doomed:
            with pytest.raises(InferenceFailed) as failure:
                await bounded(future)
            assert failure.value.status == 500
            assert failure.value.code == "inference_failed"
        assert (await bounded(after)).value == 30  # the batcher carries on
        assert engine.batches == [[0], [666, 1, 2], [3]]
        assert [(size, failed) for size, _, failed in observer.finished] == [
            (1, False),
            (3, True),
            (1, False),
        ]

        with batcher.reserve(1) as more:  # and still serves new work afterwards
            assert (await bounded(more.submit(4))).value == 40
        await bounded(batcher.close(WAIT_S))

    try:
        asyncio.run(scenario())
    finally:
        engine.release()


# ---------------------------------------------------------------- draining


def test_close_runs_what_is_queued_and_refuses_new_work(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_batch_size=2, max_concurrent_batches=1)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(4)
        first = slots.submit(0)
        await engine.wait_started(1)
        queued = [slots.submit(item) for item in (1, 2, 3)]

        closing = asyncio.create_task(batcher.close(WAIT_S))
        await settle()
        assert not closing.done()  # it waits for the queued work
        with pytest.raises(Draining) as refused:
            batcher.reserve(1)
        assert refused.value.status == 503
        assert refused.value.code == "draining"

        engine.release()
        await bounded(closing)
        assert all(future.done() for future in (first, *queued))
        done = await results([first, *queued])
        assert [completed.value for completed in done] == [0, 10, 20, 30]
        assert engine.batches == [[0], [1, 2], [3]]
        assert sorted(observer.batch_sizes) == [1, 1, 2]
        assert batcher.depth == 0
        assert batcher.in_flight == 0

    asyncio.run(scenario())


def test_close_dispatches_a_partial_batch_without_waiting_for_the_delay(
    engine: FakeEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(
            engine,
            clock,
            max_batch_size=4,
            max_queue_delay_s=1000.0,
            max_concurrent_batches=2,
        )
        batcher.start()
        engine.hold()
        slots = batcher.reserve(2)
        first = slots.submit(0)
        await engine.wait_started(1)
        partial = slots.submit(1)
        await settle()
        assert engine.batches == [[0]]

        closing = asyncio.create_task(batcher.close(WAIT_S))
        await engine.wait_started(2)  # goes while the first batch still runs
        assert engine.batches == [[0], [1]]

        engine.release()
        await bounded(closing)
        assert [completed.value for completed in await results([first, partial])] == [0, 10]

    asyncio.run(scenario())


def test_close_fails_what_is_left_when_the_engine_outlasts_the_timeout(
    engine: FakeEngine,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, observer, max_concurrent_batches=1)
        batcher.start()
        engine.hold()
        slots = batcher.reserve(3)
        running = slots.submit(0)
        await engine.wait_started(1)
        queued = [slots.submit(1), slots.submit(2)]

        # 0.2 s bounds how long close waits for the blocked engine; nothing is timed.
        await bounded(batcher.close(0.2))
        for future in (running, *queued):
            with pytest.raises(Draining):
                await bounded(future)
        assert engine.batches == [[0]]
        with pytest.raises(Draining):
            batcher.reserve(1)
        await settle()
        assert [(size, failed) for size, _, failed in observer.finished] == [(1, True)]

        engine.release()  # let the pool thread finish

    asyncio.run(scenario())


def test_a_submit_after_close_gave_up_fails_with_draining(
    engine: FakeEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock)
        batcher.start()
        slots = batcher.reserve(1)  # a request still decoding when the drain starts
        # close() waits for the reservation (it may yet be submitted); 0.2 s bounds that.
        await bounded(batcher.close(0.2))
        try:
            future = slots.submit(1)  # the request finishes decoding, too late
        except Draining:
            return  # refusing the submit outright is as good as failing its future
        await settle()
        assert future.done(), "the item was queued after the batcher stopped"
        with pytest.raises(Draining):
            future.result()
        assert engine.batches == []

    asyncio.run(scenario())


def test_a_reservation_released_while_closing_lets_close_finish_at_once(
    engine: FakeEngine, clock: FakeClock
) -> None:
    """A request that fails while decoding gives its slots back during a drain: close()
    must notice then, not sit out its whole timeout (it used to: nothing woke the loop)."""

    async def scenario() -> None:
        batcher = make_batcher(engine, clock)
        batcher.start()
        slots = batcher.reserve(1)
        closing = asyncio.create_task(batcher.close(60.0))
        await settle()
        assert not closing.done()  # it waits: the reservation may yet be submitted
        slots.release()
        await bounded(closing)  # WAIT_S bound; a stalled close would take 60 s
        assert batcher.depth == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- refilling after a batch


def test_after_a_batch_the_queue_refills_to_its_size_before_dispatch(
    engine: FakeEngine, clock: FakeClock
) -> None:
    """Closed-loop clients: the 4 whose batch just finished send again; the first to
    arrive must not go alone (that splits the load into batches of 1 and 3 forever)."""

    async def scenario() -> None:
        batcher = make_batcher(engine, clock, max_batch_size=8, max_queue_delay_s=10.0)
        batcher.start()
        with batcher.reserve(4) as slots:
            first = [slots.submit(item) for item in range(4)]
        await results(first)
        assert engine.batches == [[0, 1, 2, 3]]

        slots = batcher.reserve(4)
        second = [slots.submit(4)]
        await settle()
        assert engine.batches == [[0, 1, 2, 3]], "dispatched alone right after a batch of 4"
        second += [slots.submit(item) for item in (5, 6, 7)]
        await results(second)
        assert engine.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_refill_wait_ends_after_the_delay(engine: FakeEngine, clock: FakeClock) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, max_batch_size=8, max_queue_delay_s=10.0)
        batcher.start()
        with batcher.reserve(3) as slots:
            await results([slots.submit(item) for item in range(3)])
        slots = batcher.reserve(2)
        late = [slots.submit(3)]
        await settle()
        assert engine.batches == [[0, 1, 2]]
        clock.advance(10.0)
        late.append(slots.submit(4))  # wakes the batcher; the delay since the batch is over
        await results(late)
        assert engine.batches == [[0, 1, 2], [3, 4]]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_lone_client_never_waits_for_the_delay(engine: FakeEngine, clock: FakeClock) -> None:
    async def scenario() -> None:
        batcher = make_batcher(engine, clock, max_queue_delay_s=1000.0)
        batcher.start()
        for item in range(5):  # one request after another, each answered at once
            with batcher.reserve(1) as slots:
                await results([slots.submit(item)])
        assert engine.batches == [[0], [1], [2], [3], [4]]
        assert clock.now == 1000.0
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_without_partial_batches_while_busy_only_a_full_batch_joins_a_running_one(
    engine: FakeEngine, clock: FakeClock
) -> None:
    """The CPU policy: a second batch beside a running one only for a full batch, however
    long the partial one has waited; it goes once the running batch finishes."""

    async def scenario() -> None:
        batcher = make_batcher(
            engine,
            clock,
            max_batch_size=3,
            max_queue_delay_s=1.0,
            max_concurrent_batches=2,
            partial_batches_while_busy=False,
        )
        batcher.start()
        engine.hold()
        slots = batcher.reserve(7)
        first = slots.submit(0)
        await engine.wait_started(1)
        partial = [slots.submit(1)]
        clock.advance(5.0)  # far past the delay
        partial.append(slots.submit(2))  # wakes the batcher: 2 of 3, oldest waited 5 s
        await settle()
        assert engine.batches == [[0]], "a partial batch started beside a running one"
        extra = slots.submit(9)  # now a full batch of 3 is waiting
        await engine.wait_started(2)
        assert engine.batches == [[0], [1, 2, 9]]
        late = [slots.submit(3), slots.submit(4)]
        clock.advance(5.0)
        late.append(slots.submit(5))  # a full batch again, but both slots are busy
        await settle()
        assert engine.batches == [[0], [1, 2, 9]]
        engine.release()
        await results([first, *partial, extra, *late])
        assert engine.batches == [[0], [1, 2, 9], [3, 4, 5]]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_batch_beside_a_running_one_is_full_at_the_busy_size(
    engine: FakeEngine, clock: FakeClock
) -> None:
    """The CPU policy: beside a running batch, two waiting images make a full batch and
    start at once, and it takes no more than two; an idle engine takes up to the maximum."""

    async def scenario() -> None:
        batcher = make_batcher(
            engine,
            clock,
            max_batch_size=6,
            max_concurrent_batches=2,
            partial_batches_while_busy=False,
            busy_batch_size=2,
        )
        batcher.start()
        engine.hold()
        slots = batcher.reserve(12)
        first = slots.submit(0)
        await engine.wait_started(1)
        waiting = [slots.submit(1)]
        await settle()
        assert engine.batches == [[0]], "one image is not a full busy batch"
        waiting += [slots.submit(item) for item in (2, 3, 4)]
        await engine.wait_started(2)
        assert engine.batches == [[0], [1, 2]], "two images beside a running batch, no more"
        engine.release()
        await results([first, *waiting])
        assert engine.batches == [[0], [1, 2], [3, 4]]
        engine.hold()
        alone = [slots.submit(item) for item in range(10, 17)]
        await engine.wait_started(4)
        await settle()
        # Nothing ran: the first batch takes the maximum; the one left is no full busy batch.
        assert engine.batches[3:] == [[10, 11, 12, 13, 14, 15]]
        engine.release()
        await results(alone)
        assert engine.batches[3:] == [[10, 11, 12, 13, 14, 15], [16]]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


# ---------------------------------------------------------------- batches that run alone


class SteppedEngine(FakeEngine):
    """`run_batch` and `run_alone` for the batcher: records each batch and whether it ran
    alone; each batch blocks until the test finishes it by index (or `finish_all`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ran_alone: list[bool] = []
        self._done: list[threading.Event] = []
        self._all_done = False

    def run(self, items: list[int], alone: bool = False) -> Sequence[int]:
        done = threading.Event()
        with self._changed:
            self.batches.append(list(items))
            self.ran_alone.append(alone)
            self._done.append(done)
            if self._all_done:
                done.set()
            self._changed.notify_all()
        if not done.wait(WAIT_S * 2):
            raise RuntimeError("the test never finished this batch")
        return self._respond(items)

    def run_alone(self, items: list[int]) -> Sequence[int]:
        return self.run(items, alone=True)

    def finish(self, index: int) -> None:
        self._done[index].set()

    def finish_all(self) -> None:
        with self._changed:
            self._all_done = True
            for done in self._done:
                done.set()


@pytest.fixture
def stepped() -> Iterator[SteppedEngine]:
    engine = SteppedEngine()
    yield engine
    engine.finish_all()  # never leave a pool thread blocked, whatever the test did


def alone_batcher(engine: SteppedEngine, clock: FakeClock) -> DynamicBatcher[int, int]:
    """The CPU policy with a solo session: 2 instances, batches of 2 beside each other."""
    return DynamicBatcher(
        engine.run,
        max_batch_size=8,
        max_queue_delay_s=0.0,
        max_queue_size=100,
        max_concurrent_batches=2,
        busy_batch_size=2,
        run_alone=engine.run_alone,
        clock=clock,
    )


def test_nothing_starts_beside_a_batch_that_runs_alone(
    stepped: SteppedEngine, clock: FakeClock
) -> None:
    """A lone request runs alone; a full batch that arrives meanwhile waits for it, then
    the queue (longer than one busy batch) goes out in busy batches side by side."""

    async def scenario() -> None:
        batcher = alone_batcher(stepped, clock)
        batcher.start()
        slots = batcher.reserve(5)
        futures = [slots.submit(0)]
        await stepped.wait_started(1)
        futures += [slots.submit(item) for item in (1, 2, 3)]
        clock.advance(5.0)
        await settle()
        assert stepped.batches == [[0]], "a batch started beside one that runs alone"
        stepped.finish(0)
        await stepped.wait_started(3)
        # Two threads start the two batches: either may reach the engine first.
        assert sorted(stepped.batches[1:]) == [[1, 2], [3]]
        assert stepped.ran_alone == [True, False, False]
        futures.append(slots.submit(4))  # both instances busy: waits for one
        await settle()
        assert len(stepped.batches) == 3
        stepped.finish(1)
        await stepped.wait_started(4)
        assert stepped.batches[3] == [4]
        assert stepped.ran_alone[3] is False, "a batch beside a running one never runs alone"
        stepped.finish_all()
        done = await results(futures)
        assert [completed.value for completed in done] == [0, 10, 20, 30, 40]
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_a_queue_that_fits_one_busy_batch_runs_alone_as_one_batch(
    stepped: SteppedEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = alone_batcher(stepped, clock)
        batcher.start()
        slots = batcher.reserve(3)
        futures = [slots.submit(0)]
        await stepped.wait_started(1)
        futures += [slots.submit(1), slots.submit(2)]
        await settle()
        stepped.finish(0)
        await stepped.wait_started(2)
        await settle()
        assert stepped.batches == [[0], [1, 2]]
        assert stepped.ran_alone == [True, True]
        stepped.finish_all()
        await results(futures)
        await bounded(batcher.close(WAIT_S))

    asyncio.run(scenario())


def test_close_waits_for_a_batch_that_runs_alone_then_runs_the_queue(
    stepped: SteppedEngine, clock: FakeClock
) -> None:
    async def scenario() -> None:
        batcher = alone_batcher(stepped, clock)
        batcher.start()
        slots = batcher.reserve(4)
        futures = [slots.submit(0)]
        await stepped.wait_started(1)
        futures += [slots.submit(item) for item in (1, 2, 3)]
        closing = asyncio.create_task(batcher.close(WAIT_S))
        await settle()
        assert stepped.batches == [[0]], "closing started a batch beside one that runs alone"
        stepped.finish_all()
        await bounded(closing)
        assert [completed.value for completed in await results(futures)] == [0, 10, 20, 30]
        assert stepped.batches[0] == [0]
        assert sorted(stepped.batches[1:]) == [[1, 2], [3]]  # side by side, either first

    asyncio.run(scenario())
