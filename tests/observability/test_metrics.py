"""/metrics as an operator meets it: what exists from the start, what moves when, the
OpenMetrics exposition (exemplars), GPU series and the separate metrics port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from service.observability import metrics as metrics_module
from service.observability.gpu_metrics import GpuCollector
from service.observability.metrics import (
    BATCH_OUTCOMES,
    ENDPOINTS,
    REJECTION_REASONS,
    SKIP_REASONS,
    STATUSES,
    ServiceMetrics,
)
from tests.support import FakeEngine, metric_value, running_server

PNG_HEADERS = {"content-type": "image/png"}


def test_no_created_series_and_every_label_set_exists_at_zero() -> None:
    text = ServiceMetrics().render().decode()
    assert "_created" not in text
    for reason in REJECTION_REASONS:
        assert f'resnet_rejections_total{{reason="{reason}"}} 0.0' in text
    for reason in SKIP_REASONS:
        assert f'resnet_skipped_images_total{{reason="{reason}"}} 0.0' in text
    for outcome in BATCH_OUTCOMES:
        assert f'resnet_batches_total{{outcome="{outcome}"}} 0.0' in text
    for endpoint in ENDPOINTS:
        assert f'resnet_images_total{{endpoint="{endpoint}"}} 0.0' in text
        assert f'resnet_request_duration_seconds_count{{endpoint="{endpoint}"}} 0.0' in text
        for status in STATUSES:
            assert f'resnet_requests_total{{endpoint="{endpoint}",status="{status}"}} 0.0' in text
    assert "resnet_ready 0.0" in text
    assert "resnet_gpu_" not in text


def test_openmetrics_when_asked_with_the_trace_id_as_exemplar() -> None:
    metrics = ServiceMetrics()
    metrics_module.set_exemplar_source(lambda: {"trace_id": "ab" * 16})
    try:
        metrics.request_duration.labels("predict").observe(0.004)
    finally:
        metrics_module.set_exemplar_source(None)
    metrics.request_duration.labels("embed").observe(0.004)  # no source: no exemplar
    body, content_type = metrics.render_for("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    exemplars = [line for line in text.splitlines() if "# {" in line]
    assert len(exemplars) == 1
    assert 'endpoint="predict",le="0.005"' in exemplars[0]
    assert f'trace_id="{"ab" * 16}"' in exemplars[0]
    classic, classic_type = metrics.render_for(None)
    assert classic_type.startswith("text/plain")
    assert b"trace_id" not in classic


@dataclass
class SlowWarmEngine(FakeEngine):
    def warm_up(self, batch_sizes: list[int]) -> None:
        time.sleep(0.05)


@pytest.fixture
def served(resnet18_package: Path) -> Iterator[tuple[str, ServiceMetrics]]:
    num_classes = ModelPackage.load(resnet18_package).manifest.num_classes
    engine = SlowWarmEngine(num_classes=num_classes)
    app = create_app(Settings(model_dir=resnet18_package), engine_factory=engine.factory)
    with running_server(app) as url:
        yield url, app.state.metrics


def _rejections(text: str) -> dict[str, float]:
    return {
        r: metric_value(text, "resnet_rejections_total", {"reason": r}) for r in REJECTION_REASONS
    }


def test_a_rejection_moves_its_reason_and_status_only(
    served: tuple[str, ServiceMetrics],
) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as http:
        before = http.get("/metrics").text
        response = http.post("/predict", content=b"not a png", headers=PNG_HEADERS)
        assert response.status_code == 400
        after = http.get("/metrics").text
    moved = {
        reason: count - _rejections(before)[reason]
        for reason, count in _rejections(after).items()
        if count != _rejections(before)[reason]
    }
    assert moved == {"bad_input": 1}
    labels = {"endpoint": "predict", "status": "400"}
    assert (
        metric_value(after, "resnet_requests_total", labels)
        - metric_value(before, "resnet_requests_total", labels)
        == 1
    )


def test_load_and_warm_up_times_are_recorded_and_no_gpu_series_on_a_cpu(
    served: tuple[str, ServiceMetrics],
) -> None:
    url, _ = served
    text = httpx.get(f"{url}/metrics", timeout=30).text
    assert metric_value(text, "resnet_model_load_seconds") > 0
    assert metric_value(text, "resnet_model_warmup_seconds") >= 0.05
    assert metric_value(text, "resnet_ready") == 1
    assert "resnet_gpu_" not in text


class FakeNvml:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.asked.append(index)
        return f"handle-{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 2**30, total=16 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=42, memory=10)


def test_gpu_collector_reports_memory_and_utilisation() -> None:
    nvml = FakeNvml()
    registry = CollectorRegistry()
    registry.register(GpuCollector(1, nvml))
    assert nvml.asked == [1]
    assert registry.get_sample_value("resnet_gpu_memory_used_bytes", {"gpu": "1"}) == 3 * 2**30
    assert registry.get_sample_value("resnet_gpu_memory_total_bytes", {"gpu": "1"}) == 16 * 2**30
    assert registry.get_sample_value("resnet_gpu_utilization_ratio", {"gpu": "1"}) == 0.42


def test_gpu_series_appear_only_when_the_model_runs_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        metrics_module, "gpu_collector", lambda index: GpuCollector(index, FakeNvml())
    )
    on_cpu = ServiceMetrics()
    on_cpu.model_loaded(1.0, 2.0, "cpu", 0)
    assert b"resnet_gpu_" not in on_cpu.render()
    assert on_cpu.registry.get_sample_value("resnet_model_warmup_seconds") == 2.0
    on_gpu = ServiceMetrics()
    on_gpu.model_loaded(1.0, 2.0, "cuda", 0)
    on_gpu.model_loaded(1.0, 2.0, "cuda", 0)  # registered once
    assert on_gpu.registry.get_sample_value("resnet_gpu_utilization_ratio", {"gpu": "0"}) == 0.42


def test_metrics_port_serves_metrics_off_the_main_port(resnet18_package: Path) -> None:
    num_classes = ModelPackage.load(resnet18_package).manifest.num_classes
    engine = FakeEngine(num_classes=num_classes)
    app = create_app(
        Settings(model_dir=resnet18_package, metrics_port=0), engine_factory=engine.factory
    )
    metrics: ServiceMetrics = app.state.metrics
    port = metrics.serve_separately("127.0.0.1", 0)
    try:
        with running_server(app) as url:
            assert httpx.get(f"{url}/metrics", timeout=10).status_code == 404
            separate = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert separate.status_code == 200
            assert metric_value(separate.text, "resnet_ready") == 1
    finally:
        metrics.stop_serving()
