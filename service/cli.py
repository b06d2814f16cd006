"""`resnet-serve`: run the service, with draining shutdown on SIGTERM.

One engine process (the runtime, ONNX Runtime or OpenVINO, and the batcher) and
`--workers` front-end processes (HTTP, gRPC, decoding) under a supervisor
(service/supervisor.py); or, with `--workers 0`, all of it in this one process under
uvicorn. Unset, the layout is chosen from what the engine costs (service/layout.py).

Every flag is generated from `Settings`, so each one is also an environment variable
(`--max-batch-size` ↔ `RESNET_SERVE_MAX_BATCH_SIZE`) and the help text cannot drift.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any, get_args

from pydantic import ValidationError

from service.config import ENV_ONLY, ENV_PREFIX, Settings
from service.engine import runtimes
from service.frontend.app import create_app
from service.frontend.security import ApiKeys, KeyFileError
from service.frontend.server import DrainingServer, uvicorn_config
from service.layout import Layout, choose_layout
from service.model_package import ModelPackage, PackageError
from service.observability.logs import configure_logging
from service.processes import settle_garbage_collector

log = logging.getLogger("resnet_serve")
EXIT_BAD_CONFIG = 2
__all__ = ["DrainingServer", "build_parser", "main"]


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
            "Images are batched dynamically onto ONNX Runtime (CUDA when available, else CPU) "
            "or, with --runtime openvino, OpenVINO on the CPU."
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
    missing = runtimes.missing(settings.runtime)
    if missing is not None:
        print(f"resnet-serve: error: {missing}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        package = ModelPackage.load(settings.model_dir)  # fail fast, before binding the port
        ApiKeys([key.get_secret_value() for key in settings.api_keys], settings.api_keys_file)
    except (PackageError, KeyFileError) as exc:
        print(f"resnet-serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if settings.grpc_port:  # here, before any process is spawned: one line, not a traceback each
        from service.frontend.v2.grpc_install import grpc_install_problem

        problem = grpc_install_problem()
        if problem is not None:
            print(f"resnet-serve: error: {problem}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    layout = choose_layout(settings, package)
    if layout.workers == 0:
        return serve_in_one_process(settings, layout)
    from service.supervisor import Supervisor, SupervisorError

    try:
        return Supervisor(settings, layout).run()
    except SupervisorError as exc:
        print(f"resnet-serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG


def serve_in_one_process(settings: Settings, layout: Layout) -> int:
    """The front-end and the engine in this process, under uvicorn (`--workers 0`, or the
    automatic choice: on the engine the choice already opened)."""
    log.info("processes: one (%s): HTTP, decoding and the engine share this process",
             layout.reason)  # fmt: skip
    app = create_app(settings, engine_factory=layout.engine_factory)
    chosen = "auto" if settings.workers is None else "set"
    app.state.processes.update(workers_chosen=chosen, layout=layout.reason)
    if settings.metrics_port is not None:  # observability hook: /metrics off the main port
        bound = app.state.metrics.serve_separately(settings.host, settings.metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, bound)
    settle_garbage_collector()
    server = DrainingServer(
        uvicorn_config(app, settings), app.state.runtime, settings.shutdown_grace_s
    )
    server.run()
    return server.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
