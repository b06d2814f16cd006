"""Prometheus metrics a platform team can act on: traffic, latency by stage, batch sizes,
queue depth and every reason work was refused or dropped.

Each app owns its registry (no process-wide singletons), so tests and several apps in
one process never share counters. Every label set the dashboard and alerts use exists at
zero from the start (a counter that appears only at its first increment hides that first
increment from `rate()`), and the `*_created` series are off. docs/operations.md lists
each metric and the question it answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, start_http_server

from service.observability.gpu_metrics import gpu_collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

# `*_created` series double the series count and trip up anyone who sums a whole metric.
disable_created_metrics()

# The label values created at zero. Extend these lists when a new value appears.
ENDPOINTS = ("predict", "embed", "v2_http", "v2_grpc")  # v2: the Open Inference Protocol
STATUSES = (
    "200",
    "400",
    "401",
    "404",
    "408",
    "413",
    "415",
    "422",
    "429",
    "499",
    "500",
    "503",
    "504",
)
# Every value `runtime.error_reason` can return (too_busy, body_timeout and unauthorized
# come with the reliability work of issue 7).
REJECTION_REASONS = [
    "queue_full",
    "too_busy",
    "draining",
    "not_ready",
    "engine_unavailable",
    "deadline",
    "client_disconnected",
    "body_timeout",
    "unauthorized",
    "bad_input",
    "internal",
]
SKIP_REASONS = ("abandoned", "deadline")
BATCH_OUTCOMES = ("ok", "failed")

ExemplarSource = Callable[[], dict[str, str] | None]
_exemplar_source: ExemplarSource | None = None


def set_exemplar_source(source: ExemplarSource | None) -> None:
    """Where latency histograms get their exemplars (the current trace id); tracing sets
    it when it is switched on. None (the default) adds nothing to an observation."""
    global _exemplar_source
    _exemplar_source = source


class ExemplarHistogram(Histogram):
    """A Histogram whose observations carry the current trace id as an exemplar when
    tracing is on (shown only in the OpenMetrics format, which Prometheus asks for when
    started with `--enable-feature=exemplar-storage`)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar is None and _exemplar_source is not None:
            exemplar = _exemplar_source()
        super().observe(amount, exemplar)


LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Also the batcher's `BatchObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resnet_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.request_duration = ExemplarHistogram(
            "resnet_request_duration_seconds",
            "time from a request's arrival to its response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_progress = Gauge(
            "resnet_requests_in_progress",
            "inference requests accepted and not yet answered",
            registry=r,
        )
        self.images = Counter(
            "resnet_images", "images answered successfully, by endpoint", ["endpoint"], registry=r
        )
        self.decode_duration = Histogram(
            "resnet_decode_duration_seconds",
            "decoding and resizing one image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_gauge = Gauge(
            "resnet_queue_depth", "images admitted and not yet on the engine", registry=r
        )
        self.queue_capacity = Gauge(
            "resnet_queue_capacity", "max_queue_size: beyond it requests get 429", registry=r
        )
        self.queue_wait = Histogram(
            "resnet_queue_wait_seconds",
            "time an image waited in the queue before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "resnet_batch_size", "images per engine run", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            "resnet_inference_duration_seconds",
            "one engine run (a whole batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "resnet_batches", "engine runs by outcome (ok, failed)", ["outcome"], registry=r
        )
        self.skipped_images = Counter(
            "resnet_skipped_images",
            "queued images dropped before inference: abandoned (client gone or gave up), "
            "deadline (expired in the queue)",
            ["reason"],
            registry=r,
        )
        self.rejections = Counter(
            "resnet_rejections",
            "requests refused or failed, by reason (" + ", ".join(REJECTION_REASONS) + ")",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("resnet_ready", "1 when the model is loaded and warm", registry=r)
        self.model = Info("resnet_model", "the model being served", registry=r)
        self.model_load_seconds = Gauge(
            "resnet_model_load_seconds",
            "time to read the package and create the inference session(s)",
            registry=r,
        )
        self.model_warmup_seconds = Gauge(
            "resnet_model_warmup_seconds",
            "time to run the warm-up batches before readiness",
            registry=r,
        )
        self._gpu_lock = threading.Lock()
        self._gpu_registered = False
        self._metrics_server: WSGIServer | None = None
        self.ready.set(0)
        for endpoint in ENDPOINTS:
            self.request_duration.labels(endpoint)
            self.images.labels(endpoint)
            for status in STATUSES:
                self.requests.labels(endpoint, status)
        for outcome in BATCH_OUTCOMES:
            self.batches.labels(outcome)
        for reason in SKIP_REASONS:
            self.skipped_images.labels(reason)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for: OpenMetrics (with exemplars) when its
        Accept header names it, else the classic text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def model_loaded(self, load_s: float, warmup_s: float, device: str, device_id: int) -> None:
        """Called once the model is loaded and warm: timings, and GPU series on CUDA."""
        self.model_load_seconds.set(load_s)
        self.model_warmup_seconds.set(warmup_s)
        if device != "cuda":
            return
        with self._gpu_lock:
            if self._gpu_registered:
                return
            collector = gpu_collector(device_id)
            if collector is not None:
                self.registry.register(collector)
                self._gpu_registered = True

    def serve_separately(self, host: str, port: int) -> int:
        """Serve /metrics (any path, in fact) on its own port, off the application's
        listener, in a daemon thread; returns the port bound (for port 0)."""
        self._metrics_server, _thread = start_http_server(port, host, self.registry)
        return int(self._metrics_server.server_address[1])

    def stop_serving(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    # --- BatchObserver

    def queue_depth(self, depth: int) -> None:
        self.queue_depth_gauge.set(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def batch_finished(self, size: int, run_s: float, failed: bool) -> None:
        self.inference_duration.observe(run_s)
        self.batches.labels("failed" if failed else "ok").inc()

    def skipped(self, reason: str) -> None:
        self.skipped_images.labels(reason).inc()
