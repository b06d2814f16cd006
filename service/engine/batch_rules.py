"""When the batcher forms a batch, how large it is, and how it runs: the rules alone, as
pure functions of the queue and the engine slots, so they read (and test) without threads
or an event loop. `service/engine/batching.py` owns the queue and runs the batches.

A batch is formed when one of these holds:

- the queue holds a full batch: `max_batch_size` items, or `busy_batch_size` for a batch
  that will run beside another (a batch beside a running one shares the device, and on a
  CPU runs on an instance with a share of the cores, where a large batch would hold its
  images for several times as long as on all of them);
- the engine is idle: nothing runs and it has been free for `max_queue_delay`, or the
  queue holds as many items as the last batch had. A lone request never waits for
  company, while right after a batch of N the queue gets up to `max_queue_delay` to
  refill to N, so a steady load keeps its batch size instead of splitting;
- a batch runs and a slot is free (`max_concurrent_batches` > 1): the oldest waiting item
  has waited `max_queue_delay` (unless `partial_batches_while_busy` is off: then only
  full batches start beside a running one).

When every engine slot is busy, only a full batch is formed: it is *handed over early*,
to wait on the engine threads, and the thread that frees first starts it at once instead
of waiting for the event loop to hand it the next batch. A full batch could not have
grown by waiting, so nothing is lost.

Where batches may run alone (a CPU engine with a session on every core beside its
one-per-batch instances), a batch formed while nothing runs, from a queue of no more than
`busy_batch_size` items, runs *alone*: nothing starts beside it until it ends, because a
batch beside it would take cores its threads spin on (both slow down, and the two
together serve less than either alone). A longer queue is work for several instances at
once: it goes out in batches of at most `busy_batch_size`, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueView:
    """What the rules read: the queue and the engine slots, at one moment."""

    queued: int  # items waiting in the queue
    oldest_enqueued_at: float  # when the oldest of them was queued (any value if none)
    in_flight: int  # batches formed and not finished, a batch handed over early included
    last_batch_size: int  # of the batch that finished last (0 before the first)
    last_finished: float  # when it finished (-inf before the first)


@dataclass(frozen=True)
class BatchRules:
    max_batch_size: int
    busy_batch_size: int  # at most max_batch_size
    max_queue_delay_s: float
    max_concurrent_batches: int
    partial_batches_while_busy: bool = True
    may_run_alone: bool = False

    def engine_full(self, in_flight: int) -> bool:
        """Every engine slot runs a batch: the next batch is handed over early."""
        return in_flight >= self.max_concurrent_batches

    def limit(self, in_flight: int) -> int:
        """The size of the next batch, at most: `busy_batch_size` for one that will run
        beside another, and always where batches may run alone (one that fits runs alone;
        a longer queue makes several)."""
        beside = in_flight > 0 and self.max_concurrent_batches > 1
        return self.busy_batch_size if beside or self.may_run_alone else self.max_batch_size

    def runs_alone(self, queued: int, in_flight: int) -> bool:
        return self.may_run_alone and in_flight == 0 and queued <= self.busy_batch_size

    def due(self, view: QueueView, now: float) -> bool:
        """Whether a batch should be formed from a non-empty queue now."""
        if view.queued >= self.limit(view.in_flight):
            return True
        if self.engine_full(view.in_flight):
            return False  # only a full batch is handed over early
        if view.in_flight:
            return (
                self.partial_batches_while_busy
                and now - view.oldest_enqueued_at >= self.max_queue_delay_s
            )
        return (
            view.queued >= view.last_batch_size
            or now - view.last_finished >= self.max_queue_delay_s
        )

    def time_until_due(self, view: QueueView, now: float) -> float | None:
        """Seconds until a partial batch falls due if nothing else happens; None: only
        an arrival or a finishing batch can make one due."""
        if self.engine_full(view.in_flight):
            return None
        if view.in_flight:
            if not self.partial_batches_while_busy:
                return None
            return view.oldest_enqueued_at + self.max_queue_delay_s - now
        return view.last_finished + self.max_queue_delay_s - now
