"""A deliberately cheap HTTP/1.1 load generator (asyncio protocols, pre-built requests).

It shares the cores with the server under test, so every microsecond it spends is taken
from the server: requests are serialised once up front, responses are parsed only as far
as the status line and Content-Length, and connections are kept alive.

- `closed_loop`: `concurrency` clients, each sending its next request when the previous
  answer arrives; measures saturation throughput.
- `open_loop`: requests sent on a Poisson schedule whether or not earlier ones have
  returned (new connections are opened as needed); latency counts from the *scheduled*
  send time, so time spent queueing anywhere is not hidden.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUEST_TIMEOUT_S = 60.0  # a request unanswered this long counts as an error
# An open-loop connection idle this long is closed, not reused: below uvicorn's default
# keep-alive timeout (5 s, the naive server's), so no request goes out on a connection the
# server is closing at that moment (which failed about one request in 2,000).
REUSE_IDLE_S = 2.0


def raw_request(path: str, body: bytes, content_type: str, host: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


def multipart_request(path: str, images: Sequence[bytes], host: str) -> bytes:
    boundary = uuid.uuid4().hex
    parts = []
    for index, image in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{index}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + image
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return raw_request(path, body, f"multipart/form-data; boundary={boundary}", host)


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._expected: int | None = None
        self.closed = False
        self.idle_since = time.perf_counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        if self.closed:
            self._waiter.set_exception(ConnectionError("connection closed"))
            return self._waiter
        self._buffer.clear()
        self._expected = None
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._expected is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            start = head.find(b"content-length:")
            stop = head.find(b"\r\n", start)  # -1: the last header
            length = int(head[start + 15 : stop if stop >= 0 else None]) if start >= 0 else 0
            self._status = int(head[9:12])
            self._expected = end + 4 + length
        if len(self._buffer) >= self._expected and self._waiter and not self._waiter.done():
            self._waiter.set_result(self._status)


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, host, port)
    return protocol


@dataclass
class LoadResult:
    mode: str
    target: float  # concurrency (closed loop) or offered requests/s (open loop)
    duration_s: float
    images_per_request: int
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_by_status_s: dict[int, list[float]] = field(default_factory=dict)
    errors: int = 0
    client_cpu_s: float = 0.0
    machine: MachineTimes | None = None  # the whole machine's CPU time over the window

    @property
    def completed(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + self.errors

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.duration_s

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    @property
    def client_cpu_cores(self) -> float:
        return self.client_cpu_s / self.duration_s

    def machine_cores(self) -> dict[str, float]:
        """The machine's busy and stolen CPU time in cores over the window: steal is time
        the hypervisor gave to other guests, which no setting here can win back."""
        if self.machine is None:
            return {}
        return {
            "machine_busy_cores": round(self.machine.busy_s / self.duration_s, 3),
            "steal_cores": round(self.machine.steal_s / self.duration_s, 3),
        }

    def percentile_ms(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")
        )

    def summary(self) -> dict[str, float | int | str]:
        return {
            "mode": self.mode,
            "target": self.target,
            "duration_s": round(self.duration_s, 3),
            "images_per_request": self.images_per_request,
            "completed": self.completed,
            "failed": self.failed,
            "requests_per_s": round(self.requests_per_s, 2),
            "images_per_s": round(self.images_per_s, 2),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p90_ms": round(self.percentile_ms(90), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "client_cpu_cores": round(self.client_cpu_cores, 3),
            **self.machine_cores(),
        }


@dataclass(frozen=True)
class MachineTimes:
    """CPU seconds summed over all cores, from /proc/stat (Linux)."""

    busy_s: float  # user, nice, system, irq, softirq
    steal_s: float

    def __sub__(self, earlier: MachineTimes) -> MachineTimes:
        return MachineTimes(self.busy_s - earlier.busy_s, self.steal_s - earlier.steal_s)


def machine_times(proc_stat: Path = Path("/proc/stat")) -> MachineTimes | None:
    try:
        with proc_stat.open() as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return MachineTimes((user + nice + system + irq + softirq) / tick, steal / tick)


def _since(before: MachineTimes | None) -> MachineTimes | None:
    after = machine_times()
    return after - before if after is not None and before is not None else None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    images_per_request: int = 1,
) -> LoadResult:
    """`concurrency` keep-alive clients back to back; only the measured window counts."""
    connections = [await _connect(host, port) for _ in range(concurrency)]
    result = LoadResult("closed", concurrency, duration_s, images_per_request)
    cycle = itertools.cycle(requests)
    start = time.perf_counter() + warmup_s
    stop = start + duration_s

    async def worker(connection: _Connection) -> None:
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                return
            try:
                status = await asyncio.wait_for(connection.send(next(cycle)), REQUEST_TIMEOUT_S)
            except (ConnectionError, TimeoutError):
                result.errors += 1
                return
            done = time.perf_counter()
            if sent >= start:
                result.statuses[status] = result.statuses.get(status, 0) + 1
                result.latencies_s.append(done - sent)

    cpu_before: float | None = None
    machine_before: MachineTimes | None = None

    async def measure_cpu() -> None:
        nonlocal cpu_before, machine_before
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu_before = _cpu_seconds()
        machine_before = machine_times()

    await asyncio.gather(measure_cpu(), *(worker(c) for c in connections))
    result.client_cpu_s = _cpu_seconds() - (cpu_before or _cpu_seconds())
    result.machine = _since(machine_before)
    # Requests sent before `stop` may finish after it; count the window they ran in.
    result.duration_s = max(duration_s, time.perf_counter() - start)
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    return result


def arrival_offsets(
    rate_per_s: float, duration_s: float, seed: int, count: int | None = None
) -> np.ndarray:
    """Seconds from the start of each Poisson arrival before `duration_s`: all of them, or
    the first `count` (the same seed gives the same sequence at any rate, scaled)."""
    rng = np.random.default_rng(seed)
    size = count if count is not None else int(rate_per_s * duration_s * 1.5) + 16
    offsets = np.cumsum(rng.exponential(1.0 / rate_per_s, size=size))
    return offsets[offsets < duration_s]


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    images_per_request: int = 1,
    count: int | None = None,
) -> LoadResult:
    """Poisson arrivals at `rate_per_s` for `duration_s`, or the first `count` of them if
    they come sooner; latency from the scheduled time."""
    offsets = arrival_offsets(rate_per_s, duration_s, seed, count)
    idle: list[_Connection] = [await _connect(host, port) for _ in range(8)]
    result = LoadResult("open", rate_per_s, duration_s, images_per_request)
    cycle = itertools.cycle(requests)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def reusable() -> _Connection | None:
        """The most recently freed connection, if it is fresh; the rest are older still."""
        while idle:
            connection = idle.pop()
            if not connection.closed and time.perf_counter() - connection.idle_since < REUSE_IDLE_S:
                return connection
            if connection.transport is not None:
                connection.transport.close()
        return None

    async def one(scheduled: float, request: bytes) -> None:
        connection = reusable() or await _connect(host, port)
        try:
            status = await asyncio.wait_for(connection.send(request), REQUEST_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            result.errors += 1
            if connection.transport is not None:
                connection.transport.close()
            return
        result.statuses[status] = result.statuses.get(status, 0) + 1
        latency = loop.time() - scheduled
        result.latencies_s.append(latency)
        result.latencies_by_status_s.setdefault(status, []).append(latency)
        if not connection.closed:
            connection.idle_since = time.perf_counter()
            idle.append(connection)

    cpu_before = _cpu_seconds()
    machine_before = machine_times()
    start = loop.time() + 0.05
    for offset in offsets:
        scheduled = start + float(offset)
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, next(cycle))))
    await asyncio.gather(*tasks)
    result.client_cpu_s = _cpu_seconds() - cpu_before
    result.machine = _since(machine_before)
    result.duration_s = loop.time() - start
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    return result
