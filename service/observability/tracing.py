"""OpenTelemetry request traces: off by default, on when the standard variables say so.

Tracing switches on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, unless
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Everything else comes from the
SDK's own `OTEL_*` variables (service name and resource attributes, sampler, batch span
processor, OTLP endpoint, headers, timeout). The OTLP exporter speaks HTTP/protobuf.

With tracing on, the FastAPI/ASGI instrumentation opens one server span per request,
continuing the caller's trace from its `traceparent` header; under it, `decode`,
`queue_wait` and `inference` spans (the batch size as an attribute) are placed from the
stage durations the runtime measured for the request's slowest image, counted back from
the moment its batch finished. The trace id goes into log records (`TraceContextFilter`)
and onto the request-latency histogram as an exemplar.

With tracing off nothing here imports OpenTelemetry and no middleware is installed: the
request path is exactly the untraced one. (FastAPI imports the OpenTelemetry API for its
own native telemetry, which passes requests straight through while no global tracer
provider is set; this module never sets one, so traced apps get the contrib
instrumentation's spans only, and FastAPI's native layer steps aside when it sees them.)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from service.observability import metrics

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("resnet_serve")

SERVICE_NAME = "resnet-serve"
# Probes and scrapes would drown the traces that matter.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"


class StageTimes(Protocol):
    """What `record_stages` reads of each image's result (`runtime.ImageResult`)."""

    decode_s: float
    queued_s: float
    infer_s: float
    batch_size: int


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(env)
    if exporters:
        return exporters != ["none"]
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "")
    return [name.strip().lower() for name in raw.split(",") if name.strip()]


class Tracing:
    """The tracer provider of one app, and what the request path asks of it."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer("service.observability.tracing")
        self._trace = trace

    def record_stages(self, results: Sequence[StageTimes], decode_in_batch: bool) -> None:
        """Child spans of the current (request) span for the slowest image's decode, queue
        wait and inference, ending now (when the request's last batch has finished)."""
        if not results:
            return
        end = time.time_ns()
        infer = int(max(r.infer_s for r in results) * 1e9)
        decode = int(max(r.decode_s for r in results) * 1e9)
        queued = int(max(r.queued_s for r in results) * 1e9)
        batch = max(r.batch_size for r in results)
        infer_start = end - infer
        if decode_in_batch:  # queue, then decode as the batch's first step, then the engine
            decode_start = infer_start - decode
            queue_start, queue_end = decode_start - queued, decode_start
        else:  # decoded on arrival, then queued as pixels
            queue_start, queue_end = infer_start - queued, infer_start
            decode_start = queue_start - decode
        attributes = {"resnet.images": len(results), "resnet.batch_size": batch}
        spans = (
            ("decode", decode_start, decode_start + decode),
            ("queue_wait", queue_start, queue_end),
            ("inference", infer_start, end),
        )
        for name, start, stop in spans:
            span = self.tracer.start_span(name, start_time=start, attributes=attributes)
            span.end(end_time=stop)

    def exemplar(self) -> dict[str, str] | None:
        context = self._trace.get_current_span().get_span_context()
        if not (context.is_valid and context.trace_flags.sampled):
            return None
        return {"trace_id": format(context.trace_id, "032x")}

    def shutdown(self) -> None:
        self.provider.shutdown()


class TraceContextFilter(logging.Filter):
    """Sets `record.trace_id` and `record.span_id` (hex) from the current span, for the
    JSON log formatter; leaves records outside a span untouched. Only installed (and
    OpenTelemetry only imported) when tracing is on."""

    def __init__(self) -> None:
        super().__init__()
        from opentelemetry import trace

        self._trace = trace

    def filter(self, record: logging.LogRecord) -> bool:
        context = self._trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    names = _exporter_names(env) or ["otlp"]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = env.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
            )
            if protocol and protocol != "http/protobuf":
                raise ValueError(
                    f"OTLP protocol {protocol!r} is not supported: resnet-serve exports traces "
                    "over http/protobuf (set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout from OTEL_*
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")
    return exporters


def _provider(
    version: str, exporters: Sequence[SpanExporter], batch: bool, env: Mapping[str, str]
) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes: dict[str, Any] = {"service.version": version}
    named = "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not (env.get("OTEL_SERVICE_NAME") or named):
        attributes["service.name"] = SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler: OTEL_TRACES_*
    for exporter in exporters:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    return provider


def instrument(
    app: FastAPI,
    version: str = "0+unknown",
    *,
    exporter: SpanExporter | None = None,
    env: Mapping[str, str] = os.environ,
    announce: bool = True,
) -> Tracing | None:
    """Trace `app` when the environment asks for it (or when a test passes `exporter`, which
    then receives every span synchronously); returns None, having imported nothing, when
    tracing is off. Call before the app serves its first request. A tracing setting the
    service cannot honour (an unknown exporter or protocol, or the `tracing` extra not
    installed) is logged as one warning and leaves tracing off: traces are never worth
    refusing to serve. With `announce` false (every front-end but one) that warning is
    logged at DEBUG, so a server of several processes says it once."""
    if exporter is None and not enabled(env):
        return None
    level = logging.WARNING if announce else logging.DEBUG
    try:
        # The SDK, the exporter and the instrumentation come with the `tracing` extra; an
        # install without it (a slim image) must still serve, untraced.
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        exporters = [exporter] if exporter is not None else _exporters(env)
        provider = _provider(version, exporters, batch=exporter is None, env=env)
    except ImportError as exc:
        log.log(
            level,
            "tracing stays OFF: %s (the OTEL_* variables ask for traces; install "
            "resnet-serve[tracing] to send them)",
            exc,
        )
        return None
    except ValueError as exc:
        log.log(level, "tracing stays OFF: %s", exc)
        return None
    tracing = Tracing(provider)
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=EXCLUDED_URLS,
        exclude_spans=["receive", "send"],
    )
    metrics.set_exemplar_source(tracing.exemplar)
    install_log_filter()
    log.info("tracing on: spans go to %s", ", ".join(_exporter_names(env) or ["otlp"]))
    return tracing


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Add a `TraceContextFilter` to every handler of `logger` (the root logger by default)
    that lacks one, so every record they format carries the trace id."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())
