"""OpenTelemetry traces: off by default at no cost, on through the standard OTEL_*
variables; spans checked with the SDK's in-memory exporter."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loadtests.server import free_port, running_process
from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from service.observability import metrics as metrics_module
from service.observability import tracing
from service.observability.logs import RequestIdMiddleware
from tests.support import FakeEngine, running_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_switched_by_the_standard_variables(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


def test_tracing_off_imports_nothing_and_installs_nothing(resnet18_package: Path) -> None:
    """The untraced request path is exactly the one without tracing: no OpenTelemetry SDK,
    exporter or instrumentation loaded, no middleware added, no exemplar source. (FastAPI
    itself imports the OpenTelemetry *API* for its native telemetry, which stays a
    pass-through while no tracer provider is configured globally; we never set one.)"""
    script = f"""
import sys
from service.frontend.app import create_app
from service.config import Settings
from service.observability.logs import RequestIdMiddleware
from service.observability import metrics
app = create_app(Settings(model_dir={str(resnet18_package)!r}))
heavy = ("opentelemetry.sdk", "opentelemetry.instrumentation", "opentelemetry.exporter")
loaded = sorted(m for m in sys.modules if m.startswith(heavy))
assert not loaded, loaded
assert app.state.tracing is None
assert [m.cls for m in app.user_middleware] == [RequestIdMiddleware], app.user_middleware
assert metrics._exemplar_source is None
from opentelemetry import trace
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
print("untraced")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "untraced"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "otlp, console or none"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ],
)
def test_an_unsupported_exporter_is_logged_and_tracing_stays_off(
    resnet18_package: Path,
    env: dict[str, str],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(Settings(model_dir=resnet18_package))
    with caplog.at_level(logging.WARNING, logger="resnet_serve"):
        assert tracing.instrument(app, env=env) is None
    assert message in caplog.text
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "tracing stays OFF" in record.getMessage()
    assert [m.cls for m in app.user_middleware] == [RequestIdMiddleware]


# What `.[tracing]` adds to an install (the OpenTelemetry API comes with FastAPI itself).
TRACING_EXTRA_MODULES = (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
)
BLOCK_TRACING_EXTRA = f"""
import importlib.abc
import sys


class BlockTracingExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith({TRACING_EXTRA_MODULES!r}):
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
        return None


sys.meta_path.insert(0, BlockTracingExtra())
"""


def test_tracing_asked_for_without_the_extra_warns_once_and_serves(
    resnet18_package: Path,
    photo_jpegs: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image without the `tracing` extra, started with the OTLP endpoint set (as
    deploy/README's "Turn tracing on" says): the real `resnet-serve` command logs one
    warning and serves, untraced, instead of crash-looping on ModuleNotFoundError."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TRACING_EXTRA)
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "resnet-serve"),
        "--model-dir", str(resnet18_package),
        "--port", str(port),
        "--warmup-batch-sizes", "1",
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with running_process(command, port, log_path, timeout_s=120):  # SIGTERM on the way out
        response = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            content=next(iter(photo_jpegs.values())),
            headers={"content-type": "image/jpeg"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    output = log_path.read_text()
    assert "drained" in output, output  # a clean shutdown, not a crash
    mentions = [line for line in output.splitlines() if "tracing" in line.lower()]
    assert len(mentions) == 1, output
    (warning,) = mentions
    assert "WARNING" in warning
    assert "tracing stays OFF" in warning
    assert "No module named 'opentelemetry.instrumentation" in warning
    assert "resnet-serve[tracing]" in warning
    assert "Traceback" not in output


@pytest.fixture
def traced(resnet18_package: Path) -> Iterator[tuple[str, InMemorySpanExporter]]:
    num_classes = ModelPackage.load(resnet18_package).manifest.num_classes
    engine = FakeEngine(num_classes=num_classes)
    app = create_app(Settings(model_dir=resnet18_package), engine_factory=engine.factory)
    exporter = InMemorySpanExporter()
    app.state.tracing = tracing.instrument(app, "test", exporter=exporter)
    try:
        with running_server(app) as url:
            yield url, exporter
    finally:
        metrics_module.set_exemplar_source(None)
        app.state.tracing.shutdown()


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_one_span_per_request_with_stage_children_linked_to_traceparent(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    url, exporter = traced
    headers = {"content-type": "image/png", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").status_code == 200  # excluded from traces
        response = http.post("/predict", content=_png(), headers=headers)
        assert response.status_code == 200
        exemplars = http.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        ).text
    spans: dict[str, ReadableSpan] = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /predict", "decode", "queue_wait", "inference"}
    server = spans["POST /predict"]
    assert server.kind is SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.resource.attributes["service.name"] == "resnet-serve"
    for name in ("decode", "queue_wait", "inference"):
        child = spans[name]
        assert child.context.trace_id == server.context.trace_id
        assert child.parent is not None
        assert child.parent.span_id == server.context.span_id
        assert child.start_time is not None
        assert child.end_time is not None
        assert server.start_time is not None
        assert server.end_time is not None
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    assert spans["inference"].attributes is not None
    assert spans["inference"].attributes["resnet.batch_size"] == 1
    exemplar_lines = [
        line
        for line in exemplars.splitlines()
        if line.startswith("resnet_request_duration_seconds_bucket") and "# {" in line
    ]
    assert exemplar_lines
    assert all(f'trace_id="{TRACE_ID}"' in line for line in exemplar_lines)


def test_log_records_carry_the_trace_and_span_ids(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_tracing.logs")
    handler = Keep()
    handler.addFilter(tracing.TraceContextFilter())
    logger.addHandler(handler)
    logger.propagate = False
    provider = tracing._provider("test", [], batch=False, env={})
    try:
        with provider.get_tracer("test").start_as_current_span("work") as span:
            logger.warning("inside")
            context = span.get_span_context()
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = records
    assert getattr(inside, "trace_id") == format(context.trace_id, "032x")  # noqa: B009
    assert getattr(inside, "span_id") == format(context.span_id, "016x")  # noqa: B009
    assert not hasattr(outside, "trace_id")
