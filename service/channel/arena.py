"""Shared memory between one front-end and the engine: the front-end's arena.

Each front-end owns one arena: a file in /dev/shm that never has a name (`O_TMPFILE`),
mapped by the front-end and, once its descriptor has been passed over the channel's Unix
socket (`SCM_RIGHTS`), by the engine. Nothing of ours ever appears in /dev/shm, so
nothing can be left there by any exit, a crash included: the memory goes back when the
last process that maps it exits. The memory still counts against /dev/shm's size, which
is why the server checks for room at start (`check_room`).

The front-end allocates one block per request: the request's inputs (pixels or encoded
bytes), then room for its outputs. The engine reads the inputs, writes the outputs, and
says when it is done with the block (`wire.Result`); only then is the block reused.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.config import Settings

SHM_DIR = Path("/dev/shm")
ALIGN = 64  # cache-line aligned blocks: numpy views and memcpy at full speed


class ShmUnavailable(RuntimeError):
    """/dev/shm is missing or too small for the arenas these settings need."""


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def anonymous_shm_file(size: int, directory: Path = SHM_DIR) -> int:
    """A file descriptor of `size` bytes in `directory` (a tmpfs) that has no name."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as exc:
        raise ShmUnavailable(f"cannot create shared memory in {directory}: {exc}") from exc
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def check_room(needed: int, directory: Path = SHM_DIR) -> None:
    """Refuse to start when `directory` cannot hold `needed` bytes: a tmpfs that fills up
    kills the process that touches the next page (SIGBUS), mid-request."""
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        raise ShmUnavailable(f"{directory} is not usable: {exc}") from exc
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise ShmUnavailable(
            f"{directory} has {free / 2**20:.0f} MiB free; these settings need "
            f"{needed / 2**20:.0f} MiB of shared memory (mount a larger /dev/shm: in "
            "Kubernetes an emptyDir with medium: Memory, in Docker --shm-size; or lower "
            "--workers, --max-queue-size or --max-buffered-bytes)"
        )


class Arena:
    """The front-end's side: the mapping and a first-fit allocator over it."""

    def __init__(self, size: int, directory: Path = SHM_DIR) -> None:
        self.size = _aligned(size)
        self.fd = anonymous_shm_file(self.size, directory)
        self.memory = mmap.mmap(self.fd, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), by offset
        self._used: dict[int, int] = {}  # offset → size of each allocated block

    @property
    def bytes_in_use(self) -> int:
        return sum(self._used.values())

    def allocate(self, size: int) -> int | None:
        """The offset of a free block of at least `size` bytes, or None when none is left."""
        size = _aligned(max(size, 1))
        for index, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, free - size)
                self._used[offset] = size
                return offset
        return None

    def release(self, offset: int) -> None:
        size = self._used.pop(offset)
        index = bisect.bisect(self._free, (offset, 0))
        start, end = offset, offset + size
        if index < len(self._free) and self._free[index][0] == end:  # merge the next
            end += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:  # merge the previous
            start = self._free[index - 1][0]
            self._free[index - 1] = (start, end - start)
        else:
            self._free.insert(index, (start, end - start))

    def release_all(self) -> None:
        self._free = [(0, self.size)]
        self._used.clear()

    def write(self, offset: int, data: bytes | memoryview | np.ndarray) -> int:
        """Copy `data` in at `offset`; returns its length in bytes."""
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        self.memory[offset : offset + view.nbytes] = view
        return view.nbytes

    def floats(self, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self.memory, dtype=np.float32, count=count, offset=offset)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view is still alive: the GC unmaps it
            self.memory.close()
        os.close(self.fd)


@dataclass
class AttachedArena:
    """The engine's side of one front-end's arena."""

    memory: mmap.mmap
    size: int

    @classmethod
    def attach(cls, fd: int, size: int) -> AttachedArena:
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ValueError(f"the arena is {actual} bytes, not {size}")
            return cls(mmap.mmap(fd, size), size)
        finally:
            os.close(fd)  # the mapping keeps the memory

    def read_bytes(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.memory[offset : offset + length]

    def read_pixels(self, offset: int, shape: tuple[int, int, int]) -> np.ndarray:
        """A private copy: the block may be reused once the request is answered, while a
        cancelled request's images could still be in a batch."""
        count = shape[0] * shape[1] * shape[2]
        self._check(offset, count)
        view = np.frombuffer(self.memory, dtype=np.uint8, count=count, offset=offset)
        return view.reshape(shape).copy()

    def write_floats(self, offset: int, values: np.ndarray) -> int:
        count = values.size
        self._check(offset, 4 * count)
        np.frombuffer(self.memory, dtype=np.float32, count=count, offset=offset)[:] = values
        return 4 * count

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset}, {offset + length}) lies outside the arena")

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.memory.close()


# Batches in flight beyond the queue, at most, for sizing: the engine's default concurrency
# (one batch per instance on CPUs, 2 on GPUs) rarely exceeds this.
SIZING_BATCHES_IN_FLIGHT = 4


def arena_bytes(
    max_queue_size: int,
    max_batch_size: int,
    max_buffered_bytes: int,
    max_body_bytes: int,
    workers: int,
    image_bytes: int,
    output_bytes: int,
) -> int:
    """One front-end's arena: every image the server admits at once (the queue and the
    batches in flight) could be this front-end's, as pixels with their outputs; plus its
    share of the request bytes the server holds (`max_buffered_bytes`, shared out evenly,
    but never less than one whole body), which bounds the encoded images it can send."""
    images = max_queue_size + SIZING_BATCHES_IN_FLIGHT * max_batch_size
    share = max(max_buffered_bytes // max(workers, 1), max_body_bytes)
    return _aligned(images * (_aligned(image_bytes) + _aligned(output_bytes)) + share)


def shm_needed(
    settings: Settings, workers: int, image_bytes: int, output_bytes: int
) -> tuple[int, int]:
    """(bytes of one front-end's arena, bytes of /dev/shm the server needs in all)."""
    arena = arena_bytes(
        settings.max_queue_size,
        settings.max_batch_size,
        settings.max_buffered_bytes,
        settings.max_body_bytes,
        workers,
        image_bytes,
        output_bytes,
    )
    return arena, workers * arena + mmap.PAGESIZE  # + the admission counts' page
