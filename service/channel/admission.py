"""Exact admission across processes: one queue-depth count that every front-end checks
before it reads a body, and the engine keeps.

The depth is what it was in one process: images admitted and not yet on the engine. It is
the sum of each front-end's reservations (admitted, not yet received by the engine) and the
engine's own queue. A front-end reserves, the engine moves what it receives from that
front-end's count to its own, and as images start or are skipped its count falls. All of
it sits in one small shared-memory page (no name in /dev/shm: inherited by the child
processes as a file descriptor), under a POSIX record lock (`lockf`), which the kernel
releases if its holder dies: a killed process can never wedge the others.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import reduction
from typing import Any

import numpy as np

from service.channel.arena import anonymous_shm_file
from service.errors import QueueFull

MAX_FRONTENDS = 64  # slots for front-end incarnations (workers are capped well below)
_ENGINE = 0  # index of the engine's count
_DEADLINE = MAX_FRONTENDS + 1  # index of the drain deadline (float64), 0 when not draining
_SIZE = mmap.PAGESIZE


class SharedFd:
    """A file descriptor that a spawned child process inherits (pickled only while
    spawning, as multiprocessing passes its own shared memory)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_shared_fd, (reduction.DupFd(self.fd),))


def _rebuild_shared_fd(duplicate: Any) -> SharedFd:
    return SharedFd(duplicate.detach())


class AdmissionCounts:
    """The shared counts; one instance per process over the same page."""

    def __init__(self, handle: SharedFd, capacity: int) -> None:
        self.handle = handle
        self.capacity = capacity
        self._memory = mmap.mmap(handle.fd, _SIZE)
        self._counts = np.frombuffer(self._memory, dtype=np.int64, count=MAX_FRONTENDS + 1)
        self._deadline = np.frombuffer(
            self._memory, dtype=np.float64, count=1, offset=_DEADLINE * 8
        )
        self._thread_lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        """To a spawned child: the page's descriptor, mapped again there."""
        return (AdmissionCounts, (self.handle, self.capacity))

    @classmethod
    def create(cls, capacity: int) -> AdmissionCounts:
        return cls(SharedFd(anonymous_shm_file(_SIZE)), capacity)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self.handle.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.handle.fd, fcntl.LOCK_UN)

    def _depth(self) -> int:
        return int(self._counts.sum())

    @property
    def depth(self) -> int:
        with self._locked():
            return self._depth()

    # --- front-ends

    def check(self, count: int = 1) -> None:
        """Raise `QueueFull` (429) unless `count` more images fit."""
        with self._locked():
            depth = self._depth()
        if depth + count > self.capacity:
            raise _full(depth, self.capacity)

    def reserve(self, slot: int, count: int) -> None:
        with self._locked():
            depth = self._depth()
            if depth + count > self.capacity:
                raise _full(depth, self.capacity)
            self._counts[1 + slot] += count

    def release(self, slot: int, count: int) -> None:
        with self._locked():
            self._counts[1 + slot] -= count

    # --- the engine

    def received(self, slot: int, count: int) -> None:
        """`count` images reserved by front-end `slot` have reached the engine's queue
        (moved in one step: the total never dips)."""
        with self._locked():
            self._counts[_ENGINE] += count
            self._counts[1 + slot] -= count

    def set_engine_depth(self, depth: int) -> None:
        """A plain store, without the lock: the engine is the only writer of its count, an
        aligned 8-byte store is atomic, and its count rises only in `received` (locked), so
        a reader sees the depth before or after, never a torn or an under-count."""
        self._counts[_ENGINE] = depth

    def forget(self, slot: int) -> None:
        """Front-end `slot` is gone: whatever it had reserved will never arrive."""
        with self._locked():
            self._counts[1 + slot] = 0

    # --- the drain deadline, fixed once by the supervisor at SIGTERM

    def set_drain_deadline(self, deadline: float) -> None:
        with self._locked():
            if not self._deadline[0]:
                self._deadline[0] = deadline

    @property
    def drain_deadline(self) -> float | None:
        with self._locked():
            value = float(self._deadline[0])
        return value or None

    def close(self) -> None:
        del self._counts, self._deadline
        self._memory.close()


def _full(depth: int, capacity: int) -> QueueFull:
    return QueueFull(
        f"the queue holds {depth} of {capacity} images; retry later",
        headers={"Retry-After": "1"},
    )


def close_fd(handle: SharedFd) -> None:
    os.close(handle.fd)
