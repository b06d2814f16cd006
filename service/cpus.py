"""The CPUs this process may use, and the thread counts sized from them.

A container sees every core of its node (`os.cpu_count()`), but may use only its CPU
limit: the CFS quota of its cgroup (v2 `cpu.max`; v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`) and its affinity mask (`taskset`, cpusets). The count here is the
smallest of them. Threads beyond it only queue for the same cores, and ONNX Runtime threads
that spin beyond a quota burn it and get the whole pod throttled, which wrecks tail latency;
so spinning is turned off when the threads would exceed the quota.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
MAX_DECODE_WORKERS = 8
# CPUs per engine instance when the count is automatic, with at least two instances on two or
# more CPUs. ONNX Runtime runs each operator of a batch across its intra-op threads and waits
# for the slowest at every operator's end; the more threads, the more of each operator is
# spent at that barrier, so under a backlog several instances with a few threads each serve
# more than one with all of them; and with one instance the cores idle while each batch is
# decoded (docs/benchmarks.md has the measurements).
CPUS_PER_INSTANCE = 4
MIN_INSTANCES = 2


@dataclass(frozen=True)
class CpuLimit:
    cpus: float  # may be fractional: a quota of 0.5 CPU
    source: str  # where the count came from
    quota: float | None  # the CFS quota in CPUs, when one is set

    @property
    def whole(self) -> int:
        """Threads worth running: the CPUs, rounded down, at least one."""
        return max(1, math.floor(self.cpus))


def _own_cgroup_v2_path(proc_cgroup: Path) -> Path:
    """This process's cgroup v2 path relative to the root (`0::/kubepods/...`)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return Path(line[3:].lstrip("/"))
    except OSError:
        pass
    return Path()


def _v2_quota(root: Path, own: Path) -> float | None:
    """The tightest `cpu.max` from this process's cgroup up to the root."""
    tightest: float | None = None
    for directory in [root / own, *(root / parent for parent in own.parents)]:
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            cpus = int(quota) / int(period)
            tightest = cpus if tightest is None else min(tightest, cpus)
    return tightest


def _v1_quota(root: Path) -> float | None:
    for directory in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_limit(
    root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    affinity: Callable[[], int] = lambda: len(os.sched_getaffinity(0)),
) -> CpuLimit:
    """The smallest of the cgroup quota (v2, else v1) and the affinity mask."""
    mask = affinity()
    if (root / "cgroup.controllers").is_file():  # the unified (v2) hierarchy
        quota, source = _v2_quota(root, _own_cgroup_v2_path(proc_cgroup)), "cgroup v2 cpu.max"
    else:
        quota, source = _v1_quota(root), "cgroup v1 cpu.cfs_quota_us"
    if quota is not None and quota < mask:
        return CpuLimit(quota, source, quota)
    return CpuLimit(float(mask), "affinity mask", quota)


@dataclass(frozen=True)
class ThreadPlan:
    """How the CPUs are shared: engine instances side by side, the ONNX Runtime threads of
    each, the all-CPU session a batch gets when it runs alone, and the decode workers."""

    limit: CpuLimit
    instances: int  # engine instances (sessions) that run batches side by side
    intra_op_threads: int  # ONNX Runtime threads of each instance
    solo_threads: int  # threads of the session a batch gets when nothing else runs
    decode_workers: int
    spinning: bool

    def describe(self) -> dict[str, Any]:
        return {
            "cpus": round(self.limit.cpus, 3),
            "cpus_source": self.limit.source,
            "cfs_quota_cpus": None if self.limit.quota is None else round(self.limit.quota, 3),
            "engine_instances": self.instances,
            "intra_op_threads": self.intra_op_threads,
            "solo_threads": self.solo_threads,
            "decode_workers": self.decode_workers,
            "spinning": self.spinning,
        }


def plan_threads(
    limit: CpuLimit,
    intra_op_threads: int = 0,
    decode_workers: int | None = None,
    allow_spinning: bool | None = None,
    instances: int = 0,
) -> ThreadPlan:
    """0 / None mean automatic: one engine instance per `CPUS_PER_INSTANCE` CPUs (at least
    two where there are two CPUs), the CPUs shared evenly among them, an all-CPU session
    for a batch that runs alone when there are several, one decode worker per CPU (at
    most 8), and spinning unless the instances' threads together would exceed a CFS
    quota."""
    count = instances or min(limit.whole, max(MIN_INSTANCES, limit.whole // CPUS_PER_INSTANCE))
    intra = intra_op_threads or max(1, limit.whole // count)
    solo = max(intra, limit.whole) if count > 1 else intra
    decode = decode_workers or min(MAX_DECODE_WORKERS, limit.whole)
    if allow_spinning is None:
        spinning = limit.quota is None or count * intra <= limit.quota
    else:
        spinning = allow_spinning
    return ThreadPlan(limit, count, intra, solo, decode, spinning)


# Front-end processes when `--workers` is not set and the server splits (service/layout.py
# decides from the engine's cost): one per CPU, at most MAX_AUTO_WORKERS.
# Each is an event loop with decode threads of its own (no GIL between them): where the
# engine is cheap or on a GPU they decode, and decoding is the bulk of the work; where a
# CPU model dominates they mostly wait, at the cost of their memory (docs/benchmarks.md,
# "Front-end processes").
MAX_AUTO_WORKERS = 8


def auto_workers(limit: CpuLimit) -> int:
    """The number of front-end processes when `--workers` is not set and the server splits."""
    return max(1, min(MAX_AUTO_WORKERS, limit.whole))
