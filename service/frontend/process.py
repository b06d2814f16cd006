"""A front-end process: the HTTP routes (and the v2 gRPC server with `--grpc-port`) over
the engine process, reached through the channel (`RemoteEngine`). Never imports ONNX
Runtime.

Started by the supervisor (spawn). Each front-end binds its own listening socket on the
server's port with SO_REUSEPORT, so the kernel spreads new connections evenly over the
front-ends (one inherited socket let one front-end accept a whole burst of keep-alive
connections: docs/benchmarks.md, "Front-end processes").
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from service.channel.admission import AdmissionCounts, SharedFd
from service.channel.client import RemoteEngine
from service.config import Settings
from service.engine_api import EngineClient
from service.frontend.app import create_app
from service.frontend.server import FrontendServer, uvicorn_config
from service.observability.logs import configure_logging
from service.observability.metrics import ServiceMetrics
from service.processes import (
    die_with_parent,
    leave_ctrl_c_to_the_supervisor,
    settle_garbage_collector,
)

log = logging.getLogger("resnet_serve")
BACKLOG = 2048


@dataclass
class FrontendArgs:
    settings: Settings  # `port` resolved; `max_buffered_bytes` this front-end's share
    slot: int
    socket_path: str
    admission: SharedFd
    arena_bytes: int
    workers: int
    parent_pid: int
    # Whether this front-end logs what holds for the whole server (tracing left off, say):
    # the first one started does, so the log says it once, not once a front-end.
    announce: bool = True
    layout: str = "--workers set"  # why this many front-ends (service/layout.py)


def listening_socket(host: str, port: int) -> socket.socket:
    """One of the front-ends' sockets on the shared port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol
    # says TCP, and without it Nagle held each response's body behind its headers until
    # the client's delayed ACK (40 ms a lone request; measured: 68-72 ms against 25).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(False)
    return sock


def run_frontend(args: FrontendArgs) -> None:
    """The spawn target."""
    die_with_parent(args.parent_pid)
    leave_ctrl_c_to_the_supervisor()
    settings = args.settings
    configure_logging(settings.log_level, settings.log_format)
    admission = AdmissionCounts(args.admission, settings.max_queue_size)

    def engine(metrics: ServiceMetrics) -> EngineClient:
        return RemoteEngine(
            settings, metrics, args.socket_path, admission, args.slot, args.arena_bytes
        )

    app = create_app(settings, engine=engine, announce=args.announce)
    app.state.processes = {
        "workers": args.workers,
        "workers_chosen": "auto" if settings.workers is None else "set",
        "layout": args.layout,
        "frontend_pid": os.getpid(),
        "frontend_slot": args.slot,
        "engine": "its own process",
    }
    sock = listening_socket(settings.host, settings.port)
    server = FrontendServer(
        uvicorn_config(app, settings),
        app.state.runtime,
        settings.shutdown_grace_s,
        drain_deadline=lambda: admission.drain_deadline,
    )
    settle_garbage_collector()
    server.run(sockets=[sock])
    raise SystemExit(server.exit_code)
