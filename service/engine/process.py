"""The engine process: the only one that opens the runtime (ONNX Runtime, CUDA, OpenVINO).

Started by the supervisor (spawn). Opens the channel's socket first, so the front-ends
connect while the model loads; then loads and warms the model, and serves the
front-ends' requests onto one batcher (service/channel/server.py) until SIGTERM, which
the supervisor sends once the front-ends have drained. Exits 1 when the model cannot be
loaded (the supervisor exits with it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from service.channel.admission import AdmissionCounts, SharedFd
from service.channel.server import EngineServer
from service.config import Settings
from service.engine.core import EngineCore
from service.engine_api import EngineState
from service.observability.aggregate import Family, PlainCollector
from service.observability.logs import configure_logging
from service.observability.metrics import ServiceMetrics
from service.processes import (
    die_with_parent,
    leave_ctrl_c_to_the_supervisor,
    settle_garbage_collector,
)

log = logging.getLogger("resnet_serve")
EXIT_LOAD_FAILED = 1


@dataclass
class EngineArgs:
    settings: Settings
    socket_path: str
    admission: SharedFd
    frontends: int
    parent_pid: int


class SharedDepth:
    """The batcher's observer in the engine process: metrics as in one process, and the
    engine's queue count kept in the server-wide admission counts."""

    def __init__(self, metrics: ServiceMetrics, admission: AdmissionCounts) -> None:
        self.metrics = metrics
        self.admission = admission

    def queue_depth(self, depth: int) -> None:
        self.admission.set_engine_depth(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self.metrics.batch_started(size, queue_waits_s)

    def batch_finished(self, size: int, run_s: float, failed: bool) -> None:
        self.metrics.batch_finished(size, run_s, failed)

    def skipped(self, reason: str) -> None:
        self.metrics.skipped(reason)


def run_engine(args: EngineArgs) -> None:
    """The spawn target."""
    die_with_parent(args.parent_pid)
    leave_ctrl_c_to_the_supervisor()
    settings = args.settings
    configure_logging(settings.log_level, settings.log_format)
    raise SystemExit(asyncio.run(_serve(args)))


async def _serve(args: EngineArgs) -> int:
    settings = args.settings
    metrics = ServiceMetrics()
    admission = AdmissionCounts(args.admission, settings.max_queue_size)
    metrics.queue_depth_gauge.set_function(lambda: admission.depth)  # one server-wide number
    core = EngineCore(settings, metrics, observer=SharedDepth(metrics, admission))
    server = EngineServer(core, metrics, admission, args.socket_path, args.frontends)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await server.start()
    loading = asyncio.create_task(core.load(), name="load-model")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    settle_garbage_collector()
    server.broadcast_status()
    if core.state is EngineState.FAILED:
        await asyncio.sleep(0.2)  # let the front-ends read that loading failed
        await server.stop()
        log.error("exiting: the model could not be loaded")
        return EXIT_LOAD_FAILED
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = serve_metrics_separately(server, settings, loop)
    await stop.wait()
    # SIGTERM may reach every process at once (systemd, a terminal's process group): the
    # engine serves until the front-ends have drained and gone, within the one deadline.
    server.begin_drain()
    deadline = admission.drain_deadline or time.monotonic() + settings.shutdown_grace_s
    await server.wait_disconnected(max(0.0, deadline - time.monotonic()))
    if not loading.done():
        loading.cancel()
    await core.close(max(0.0, deadline - time.monotonic()))
    await server.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    log.info("engine stopped")
    return 0


def serve_metrics_separately(
    server: EngineServer, settings: Settings, loop: asyncio.AbstractEventLoop
) -> WSGIServer:
    """`--metrics-port`, served from the engine process: the whole server's families,
    collected on the engine's event loop from the HTTP server's thread at each scrape."""

    def fetch() -> list[Family]:
        return asyncio.run_coroutine_threadsafe(server.collect(), loop).result(10)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlainCollector(fetch))
    assert settings.metrics_port is not None
    http_server, _thread = start_http_server(settings.metrics_port, settings.host, registry)
    log.info("metrics on http://%s:%d/metrics", settings.host, http_server.server_address[1])
    return http_server
