"""The batching rules alone (service/engine/batch_rules.py): when a batch is due, how large,
whether it runs alone, when it is handed over early. The batcher's behaviour with real
threads is in test_batching.py."""

from __future__ import annotations

import math

from service.engine.batch_rules import BatchRules, QueueView

NOW = 100.0


def view(
    queued: int,
    in_flight: int = 0,
    waited_s: float = 0.0,
    last_batch_size: int = 0,
    idle_s: float = math.inf,
) -> QueueView:
    return QueueView(queued, NOW - waited_s, in_flight, last_batch_size, NOW - idle_s)


def rules(**overrides: object) -> BatchRules:
    values: dict[str, object] = {
        "max_batch_size": 8,
        "busy_batch_size": 2,
        "max_queue_delay_s": 0.005,
        "max_concurrent_batches": 2,
    }
    values.update(overrides)
    return BatchRules(**values)  # type: ignore[arg-type]


def test_a_batch_beside_a_running_one_is_a_busy_batch() -> None:
    assert rules().limit(in_flight=0) == 8
    assert rules().limit(in_flight=1) == 2
    # One slot: the next batch runs after the running one, not beside it.
    assert rules(max_concurrent_batches=1).limit(in_flight=1) == 8
    # Where batches may run alone, every batch is at most a busy batch.
    assert rules(may_run_alone=True).limit(in_flight=0) == 2


def test_an_idle_engine_takes_a_lone_item_or_a_refilled_queue_at_once() -> None:
    assert rules().due(view(1), NOW)  # free for long: a lone request never waits
    # Right after a batch of 4: wait for the queue to refill to 4, or for the delay.
    just_finished = {"last_batch_size": 4, "idle_s": 0.001}
    assert not rules().due(view(3, **just_finished), NOW)
    assert math.isclose(rules().time_until_due(view(3, **just_finished), NOW) or 0, 0.004)
    assert rules().due(view(4, **just_finished), NOW)
    assert rules().due(view(3, last_batch_size=4, idle_s=0.006), NOW)


def test_a_partial_batch_beside_a_running_one_waits_for_the_delay() -> None:
    assert not rules().due(view(1, in_flight=1, waited_s=0.001), NOW)
    waiting = view(1, in_flight=1, waited_s=0.001)
    assert math.isclose(rules().time_until_due(waiting, NOW) or 0, 0.004)
    assert rules().due(view(1, in_flight=1, waited_s=0.006), NOW)
    assert rules().due(view(2, in_flight=1), NOW)  # a full busy batch goes at once
    off = rules(partial_batches_while_busy=False)
    assert not off.due(view(1, in_flight=1, waited_s=1.0), NOW)
    assert off.time_until_due(view(1, in_flight=1), NOW) is None


def test_with_every_slot_busy_only_a_full_batch_is_handed_over_early() -> None:
    assert rules().engine_full(in_flight=2)
    assert not rules().engine_full(in_flight=1)
    assert not rules().due(view(1, in_flight=2, waited_s=1.0), NOW)
    assert rules().time_until_due(view(1, in_flight=2, waited_s=1.0), NOW) is None
    assert rules().due(view(2, in_flight=2), NOW)
    one_slot = rules(max_concurrent_batches=1)
    assert not one_slot.due(view(7, in_flight=1, waited_s=1.0), NOW)
    assert one_slot.due(view(8, in_flight=1), NOW)


def test_a_short_queue_on_an_idle_engine_runs_alone_where_batches_may() -> None:
    alone = rules(may_run_alone=True)
    assert alone.runs_alone(queued=2, in_flight=0)
    assert not alone.runs_alone(queued=3, in_flight=0)  # work for several instances
    assert not alone.runs_alone(queued=1, in_flight=1)
    assert not rules().runs_alone(queued=1, in_flight=0)
