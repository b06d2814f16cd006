"""`resnet-serve`: run the service under uvicorn, with draining shutdown on SIGTERM.

Every flag is generated from `Settings`, so each one is also an environment variable
(`--max-batch-size` ↔ `RESNET_SERVE_MAX_BATCH_SIZE`) and the help text cannot drift.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Sequence
from enum import Enum
from types import FrameType
from typing import Any, get_args

import uvicorn
from pydantic import ValidationError

from service.config import ENV_ONLY, ENV_PREFIX, Settings
from service.frontend.app import create_app
from service.frontend.http_protocol import with_header_timeout
from service.frontend.runtime import Runtime, State
from service.frontend.security import KeyFileError
from service.model_package import ModelPackage, PackageError
from service.observability.logs import configure_logging

log = logging.getLogger("resnet_serve")
EXIT_BAD_CONFIG = 2
EXIT_LOAD_FAILED = 1


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM (or Ctrl-C) first drains.

    On the first signal readiness turns 503 and new requests get 503 `draining`, while
    every request already accepted runs to its answer; then uvicorn closes the listener
    and exits. The whole of it (the wait, uvicorn's own graceful shutdown, the batcher's
    close) keeps one deadline, `shutdown_grace_s` after the signal, so a pod's
    `terminationGracePeriodSeconds` of grace + preStop sleep + a few seconds always
    suffices. A second signal skips the wait, a third forces the exit.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime, grace_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace_s = grace_s
        self.exit_code = 0
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
            self._loop.call_soon_threadsafe(self._spawn, self._drain())
        elif self._signals == 2:
            self.should_exit = True
        else:
            self.should_exit = self.force_exit = True

    async def _drain(self) -> None:
        runtime = self.runtime
        runtime.begin_drain(self.grace_s)
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
        if await self.runtime.wait_loaded() is State.FAILED:
            log.error("exiting: the model could not be loaded")
            self.exit_code = EXIT_LOAD_FAILED
            self.should_exit = True


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse settings for a Settings field's type."""
    if annotation is bool or set(get_args(annotation)) == {bool, type(None)}:
        return None, {"action": argparse.BooleanOptionalAction}
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str, {"choices": [member.value for member in annotation]}
    choices = get_args(annotation)
    if choices and all(isinstance(choice, str) for choice in choices):
        return str, {"choices": list(choices)}
    if annotation in (int, float):
        return annotation, {}
    return str, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-serve",
        description=(
            "Serve a resnet-export model package over HTTP: POST /predict (top-k labels), "
            "POST /embed (feature vectors), GET /healthz, /readyz, /info, /metrics, /docs, "
            "and the Open Inference Protocol (KServe v2) under /v2 and, with --grpc-port, "
            "over gRPC. "
            "Images are batched dynamically onto ONNX Runtime (CUDA when available, else CPU)."
        ),
        epilog=(
            f"Every flag can also be set by environment variable: {ENV_PREFIX}<FLAG> in upper "
            f"case with underscores, e.g. {ENV_PREFIX}MAX_BATCH_SIZE=16. Flags win over the "
            "environment. On SIGTERM the server drains: readiness 503, accepted requests "
            "finish (up to --shutdown-grace-s), then it exits."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
        # No prefixes: `--api-keys KEY` must fail, not quietly mean `--api-keys-file KEY`.
        allow_abbrev=False,
    )
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        kind, extra = _flag_type(field.annotation)
        env = ENV_PREFIX + name.upper()
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(item) for item in default) or "(automatic)"
        help_text = f"{field.description or name} [env {env}; default: {default}]"
        if kind is not None:
            extra["type"] = kind
        parser.add_argument(flag, dest=name, help=help_text.replace("%", "%%"), **extra)
    # ArgumentDefaultsHelpFormatter would print SUPPRESS; defaults are in the help text.
    parser.formatter_class = argparse.HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        print(f"resnet-serve: error: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        ModelPackage.load(settings.model_dir)  # fail fast, before binding the port
        app = create_app(settings)
    except (PackageError, KeyFileError) as exc:
        print(f"resnet-serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    config = uvicorn.Config(
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
    if settings.metrics_port is not None:  # observability hook: /metrics off the main port
        bound = app.state.metrics.serve_separately(settings.host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, bound)
    server = DrainingServer(config, app.state.runtime, settings.shutdown_grace_s)
    server.run()
    return server.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
