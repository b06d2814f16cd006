"""`ByteBudget`: the request-body bytes held by requests in progress, from the first byte
read to the response. Taken without waiting: a request that would exceed it is refused
(429) before its body is buffered, rather than queued while it holds memory. (The pixels
being decoded at once have their own budget: `service.images.pixel_budget`.)
"""

from __future__ import annotations


class ByteBudget:
    """A non-blocking counter of bytes in use (event-loop side; not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.in_use = 0

    def try_take(self, count: int) -> bool:
        if self.in_use + count > self.capacity:
            return False
        self.in_use += count
        return True

    def give_back(self, count: int) -> None:
        self.in_use = max(0, self.in_use - count)


class Lease:
    """Bytes taken from a `ByteBudget` for one request, grown as its body arrives and given
    back all at once when the request ends."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def grow_to(self, count: int) -> bool:
        """Hold `count` bytes in all; False (holding what it held) if the budget is spent."""
        if count <= self.held:
            return True
        if not self._budget.try_take(count - self.held):
            return False
        self.held = count
        return True

    def release(self) -> None:
        self._budget.give_back(self.held)
        self.held = 0
