"""The supervisor: the process `resnet-serve` runs as, which starts one engine process and
`--workers` front-end processes and watches them.

- At start it checks that /dev/shm has room for the front-ends' arenas, creates the
  server-wide admission counts, holds the port, and spawns the engine (which opens the
  channel's socket, then loads the model) and the front-ends.
- A front-end that dies is replaced (in a new admission slot) while the others serve.
- When the engine dies every in-flight request has already had its 503 (the front-ends
  see the channel close); the supervisor stops the front-ends and exits non-zero, so the
  kubelet restarts the container.
- SIGTERM (or Ctrl-C) drains every process within one deadline, `shutdown_grace_s` after
  the signal: the front-ends first (readiness 503, accepted requests answered), then the
  engine. A second signal skips the waiting, a third kills.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from service.channel.admission import MAX_FRONTENDS, AdmissionCounts
from service.channel.arena import ShmUnavailable, check_room, shm_needed
from service.channel.client import output_bytes
from service.config import Settings
from service.cpus import cpu_limit
from service.engine.process import EngineArgs, run_engine
from service.engine_api import ALL_OUTPUTS
from service.frontend.process import FrontendArgs, run_frontend
from service.layout import Layout
from service.model_package import ModelPackage
from service.processes import spawn_context

log = logging.getLogger("resnet_serve")
EXIT_ENGINE_FAILED = 1
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # for a front-end that keeps dying at start
STABLE_AFTER_S = 10.0  # a front-end that lived this long restarts at once
KILL_SLACK_S = 2.0  # after the deadline, how long a process gets before SIGKILL


class SupervisorError(Exception):
    """The server cannot start as configured (one line, for the command line)."""


@dataclass
class _Frontend:
    slot: int
    process: BaseProcess
    started: float
    failures: int = 0


class Supervisor:
    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings = settings
        self.workers = layout.workers
        self.layout = layout
        self._context = spawn_context()
        self._signals = 0
        self._wake_r, self._wake_w = os.pipe()
        self._frontends: dict[int, _Frontend] = {}
        self._next_slot = 0
        self._frontends_started = 0
        self.engine: BaseProcess | None = None

    def run(self) -> int:
        settings = self.settings
        package = ModelPackage.load(settings.model_dir)
        manifest = package.manifest
        crop = manifest.preprocessing.crop
        outputs = output_bytes(ALL_OUTPUTS, manifest.num_classes, manifest.embedding_dim)
        arena, needed = shm_needed(settings, self.workers, crop * crop * 3, outputs)
        try:
            check_room(needed)
        except ShmUnavailable as exc:
            raise SupervisorError(str(exc)) from exc
        self._arena_bytes = arena
        self.admission = AdmissionCounts.create(settings.max_queue_size)
        with self._port_held() as port, self._private_dir() as directory:
            self.port = port
            self.socket_path = str(directory / "engine.sock")
            return self._supervise()

    # ------------------------------------------------------------ resources

    @contextmanager
    def _port_held(self) -> Iterator[int]:
        """Bind (without listening) the port the front-ends will share, so it is ours
        before they start and port 0 resolves to one port for all of them."""
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind((host, self.settings.port))
        except OSError as exc:
            holder.close()
            raise SupervisorError(
                f"cannot listen on {host}:{self.settings.port}: {exc.strerror}"
            ) from exc
        try:
            yield int(holder.getsockname()[1])
        finally:
            holder.close()

    @contextmanager
    def _private_dir(self) -> Iterator[Path]:
        directory = Path(tempfile.mkdtemp(prefix="resnet-serve-"))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------ processes

    def _start_engine(self) -> BaseProcess:
        args = EngineArgs(
            self.settings, self.socket_path, self.admission.handle, self.workers, os.getpid()
        )
        process = self._context.Process(
            target=run_engine, args=(args,), name="resnet-serve-engine", daemon=False
        )
        process.start()
        return process

    def _start_frontend(self, failures: int = 0) -> None:
        slot = self._free_slot()
        share = max(self.settings.max_buffered_bytes // self.workers, self.settings.max_body_bytes)
        settings = self.settings.model_copy(update={"port": self.port, "max_buffered_bytes": share})
        args = FrontendArgs(
            settings,
            slot,
            self.socket_path,
            self.admission.handle,
            self._arena_bytes,
            self.workers,
            os.getpid(),
            announce=self._frontends_started == 0,
            layout=self.layout.reason,
        )
        self._frontends_started += 1
        process = self._context.Process(
            target=run_frontend, args=(args,), name=f"resnet-serve-frontend-{slot}", daemon=False
        )
        process.start()
        self._frontends[slot] = _Frontend(slot, process, time.monotonic(), failures)

    def _free_slot(self) -> int:
        """A slot no live front-end holds, round robin: a dead front-end's slot is reused
        only much later, after the engine has forgotten its reservations."""
        for _ in range(MAX_FRONTENDS):
            slot = self._next_slot
            self._next_slot = (self._next_slot + 1) % MAX_FRONTENDS
            if slot not in self._frontends:
                return slot
        raise RuntimeError("no free front-end slot")

    # ------------------------------------------------------------ watching

    def _supervise(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            log.info(
                "processes: 1 engine + %d front-end(s) on %s:%d (%s; %g CPU(s) available); "
                "%d MiB of shared memory per front-end",
                self.workers,
                self.settings.host,
                self.port,
                self.layout.reason,
                cpu_limit().cpus,
                self._arena_bytes // 2**20,
            )
            self.engine = self._start_engine()
            for _ in range(self.workers):
                self._start_frontend()
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        os.write(self._wake_w, b"!")

    def _watch(self) -> int:
        handled = 0
        while True:
            sentinels = {front.process.sentinel: front for front in self._frontends.values()}
            assert self.engine is not None
            ready = connection.wait([self._wake_r, self.engine.sentinel, *sentinels])
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if self._signals > handled:
                handled = self._signals
                log.info("received a signal: draining every process")
                return self._drain()
            if self.engine.sentinel in ready:
                return self._engine_died()
            for sentinel in ready:
                front = sentinels.get(sentinel) if isinstance(sentinel, int) else None
                if front is not None:
                    self._frontend_died(front)

    def _frontend_died(self, front: _Frontend) -> None:
        del self._frontends[front.slot]
        front.process.join()
        lived = time.monotonic() - front.started
        failures = 0 if lived > STABLE_AFTER_S else front.failures + 1
        delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
        log.error(
            "front-end %d (pid %s) exited with %s after %.1f s; starting a replacement%s",
            front.slot,
            front.process.pid,
            front.process.exitcode,
            lived,
            f" in {delay:g} s" if delay else "",
        )
        if delay:
            self._sleep_unless_signalled(delay)
        if not self._signals:
            self._start_frontend(failures)

    def _sleep_unless_signalled(self, seconds: float) -> None:
        connection.wait([self._wake_r], seconds)

    def _engine_died(self) -> int:
        assert self.engine is not None
        code = self.engine.exitcode
        log.error("the engine process exited with %s: stopping the front-ends and exiting", code)
        self._stop_frontends(time.monotonic() + self.settings.shutdown_grace_s)
        return EXIT_ENGINE_FAILED

    def _drain(self) -> int:
        """Front-ends first (they answer what they accepted), then the engine; one deadline.
        0 unless the engine had died on its own before it was asked to stop."""
        assert self.engine is not None
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        self.admission.set_drain_deadline(deadline)
        self._stop_frontends(deadline)
        if not self.engine.is_alive():
            return 0 if self.engine.exitcode == 0 else EXIT_ENGINE_FAILED
        self._terminate(self.engine)
        self._join(self.engine, deadline)
        return 0

    def _stop_frontends(self, deadline: float) -> None:
        for front in self._frontends.values():
            self._terminate(front.process)
        for front in list(self._frontends.values()):
            handled = self._signals
            while front.process.is_alive() and time.monotonic() < deadline + KILL_SLACK_S:
                connection.wait([front.process.sentinel, self._wake_r], 0.5)
                if self._signals > handled:  # a second signal: skip the wait
                    handled = self._signals
                    if self._signals >= 3:
                        front.process.kill()
                    else:
                        self._terminate(front.process)
            self._join(front.process, deadline)

    @staticmethod
    def _terminate(process: BaseProcess) -> None:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)

    @staticmethod
    def _join(process: BaseProcess, deadline: float) -> None:
        process.join(max(0.0, deadline - time.monotonic()) + KILL_SLACK_S)
        if process.is_alive():
            log.error("%s did not stop in time: killing it", process.name)
            process.kill()
            process.join(5)

    def _kill_all(self) -> None:
        processes = [front.process for front in self._frontends.values()]
        for process in [*processes, *([self.engine] if self.engine is not None else [])]:
            if process.is_alive():
                process.kill()
                process.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
