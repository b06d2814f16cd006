"""`PixelBudget`: the pixels being decoded at once, across all decode threads. Taken with
waiting: a decode blocks its thread until enough earlier decodes finish, so a burst of
huge images is decoded a few at a time instead of all at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    """A blocking, thread-safe budget of pixels being decoded at once.

    One image larger than the whole budget still gets through (alone): the budget bounds
    how many decode at the same time, while the per-image limit bounds each one.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        wanted = min(max(pixels, 0), self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + wanted <= self.capacity)
            self.in_use += wanted
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= wanted
                self._changed.notify_all()
