"""The front-end's HTTP server: uvicorn, configured from the settings, that drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.frontend.http_protocol import with_header_timeout
from service.frontend.runtime import Runtime, State

log = logging.getLogger("resnet_serve")
EXIT_LOAD_FAILED = 1


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=settings.event_loop,
        http=with_header_timeout(settings.header_timeout_s),
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        timeout_keep_alive=settings.keepalive_timeout_s,
        server_header=False,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM (or Ctrl-C) first drains.

    On the first signal readiness turns 503 and new requests get 503 `draining`, while
    every request already accepted runs to its answer; then uvicorn closes the listener
    and exits. The whole of it (the wait, uvicorn's own graceful shutdown, the engine's
    close) keeps one deadline, `shutdown_grace_s` after the signal (or the supervisor's,
    when `drain_deadline` gives it), so a pod's `terminationGracePeriodSeconds` of grace +
    preStop sleep + a few seconds always suffices. A second signal skips the wait, a third
    forces the exit.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        runtime: Runtime,
        grace_s: float,
        drain_deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace_s = grace_s
        self.exit_code = 0
        self._drain_deadline = drain_deadline
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self._spawn(self._exit_if_load_fails())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1 and self._loop is not None:
            log.info("received %s: draining", signal.Signals(sig).name)
            # A fresh context: the signal may land inside a request's, whose id the drain's
            # log lines must not carry.
            self._loop.call_soon_threadsafe(
                self._spawn, self._drain(), context=contextvars.Context()
            )
        elif self._signals == 2:
            self.should_exit = True
        else:
            self.should_exit = self.force_exit = True

    async def _drain(self) -> None:
        runtime = self.runtime
        deadline = self._drain_deadline()
        if deadline is None:
            runtime.begin_drain(self.grace_s)
        else:
            runtime.drain_until(deadline)
        pending = runtime.in_progress
        finished = await runtime.wait_idle(runtime.drain_time_left(self.grace_s))
        if finished:
            log.info("drained: the %d request(s) in progress at SIGTERM were answered", pending)
        else:
            log.error(
                "grace period of %.0f s ran out with %d request(s) unanswered",
                self.grace_s,
                runtime.in_progress,
            )
        # uvicorn reads this when it shuts down: what is left of the one deadline (whole
        # seconds, as uvicorn takes them; the formula's few seconds of slack cover it).
        self.config.timeout_graceful_shutdown = math.ceil(runtime.drain_time_left(self.grace_s))
        self.should_exit = True

    async def _exit_if_load_fails(self) -> None:
        if await self.runtime.wait_loaded() is State.FAILED and not self.runtime.engine_gone:
            log.error("exiting: the model could not be loaded")
            self.exit_code = EXIT_LOAD_FAILED
            self.should_exit = True


class FrontendServer(DrainingServer):
    """A front-end process's server: the supervisor decides when to stop, so Ctrl-C (which
    the terminal sends to every process of the group) is left to it."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)

    async def _exit_if_load_fails(self) -> None:
        """The engine process exits when loading fails, and the supervisor with it."""
