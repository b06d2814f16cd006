"""What every child process of the supervisor does first, and how it is started."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from multiprocessing.context import SpawnContext

_PR_SET_PDEATHSIG = 1


def spawn_context() -> SpawnContext:
    """Children start from a fresh interpreter: never forked from a process that may
    hold threads, locks or (in the engine) a CUDA context."""
    return multiprocessing.get_context("spawn")


def die_with_parent(parent_pid: int) -> None:
    """Be killed if the supervisor dies, even by SIGKILL, so no child outlives it holding
    the port or the GPU (Linux; elsewhere a child notices the closed channel instead)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def leave_ctrl_c_to_the_supervisor() -> None:
    """The terminal sends Ctrl-C to the whole process group; the supervisor turns it into
    an orderly drain of every process, so the children ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Young-generation collections every this many allocations (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Before serving: move what start-up built (modules, the app, the model's metadata)
    out of the collector's way for good, and collect the young generation less often. A
    request allocates hundreds of short-lived objects, and with the default threshold the
    collector ran every few requests (7% of a front-end's samples under load)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
