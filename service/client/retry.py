"""When to try a call again, and after how long: the same policy for both clients.

Retried: 429 (queue full, too busy) and 503 (loading, draining), and connections that
were never made; nothing else (a 4xx will fail the same way again; a 504 means the
server is too busy already). The wait is the server's `Retry-After` when it sends one,
plus jitter so that clients refused together do not come back together; otherwise an
exponential backoff with jitter, capped. The budget bounds both the number of retries
and the time: no retry starts later than `budget_s` after the first attempt, and a
`Retry-After` that would pass that point ends the call at once with the error.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.client.errors import ServiceError


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # tries after the first; 0 turns retrying off
    budget_s: float = 30.0  # no retry starts later than this after the first attempt
    backoff_s: float = 0.25  # the first wait without Retry-After; doubles each retry
    max_backoff_s: float = 5.0  # cap on that wait (a longer Retry-After is still honoured)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.budget_s < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retry settings must not be negative")

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        return retries if isinstance(retries, RetryPolicy) else cls(retries=retries)

    def start(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> Attempts:
        return Attempts(self, clock, rng or random.Random())


@dataclass
class Attempts:
    """The retry state of one call."""

    policy: RetryPolicy
    clock: Callable[[], float]
    rng: random.Random
    made: int = 0
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def next_delay(self, error: ServiceError) -> float | None:
        """Seconds to wait before trying again after `error`, or None to give up (then
        `error.attempts` says how many attempts were made)."""
        self.made += 1
        error.attempts = self.made
        policy = self.policy
        if not error.retryable or self.made > policy.retries:
            return None
        backoff = min(policy.max_backoff_s, policy.backoff_s * 2 ** (self.made - 1))
        if error.retry_after_s is not None:
            delay = error.retry_after_s + self.rng.uniform(0, backoff)
        else:
            delay = self.rng.uniform(backoff / 2, backoff)
        if self.clock() + delay - self.started > policy.budget_s:
            return None
        return delay
