"""Prometheus metrics a platform team can act on: traffic, latency by stage, batch sizes,
queue depth and every reason work was refused or dropped.

Each app owns its registry (no process-wide singletons), so tests and several apps in
one process never share counters.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.request_duration = Histogram(
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
            "requests refused or failed, by reason (queue_full, draining, not_ready, "
            "deadline, client_disconnected, bad_input, internal)",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("resnet_ready", "1 when the model is loaded and warm", registry=r)
        self.model = Info("resnet_model", "the model being served", registry=r)
        for outcome in ("ok", "failed"):
            self.batches.labels(outcome)
        for reason in ("abandoned", "deadline"):
            self.skipped_images.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

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
