"""/metrics as an operator meets it: what exists from the start, what moves when, the
OpenMetrics exposition (exemplars), GPU series and the separate metrics port."""

from __future__ import annotations

import logging
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
from service.observability import gpu_metrics
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


class FakeNvmlError(Exception):
    """pynvml.NVMLError: every NVML failure is one of these."""


class FakeNvml:
    """NVML as documented for two GPUs, `GPU-0` and `GPU-1`. With `mig=True`, GPU 0 is
    MIG-partitioned into slices MIG-a and MIG-b of 10 GiB each: NVML then reports memory
    per slice and no utilisation, for a slice or for its MIG-enabled parent (NOT_SUPPORTED).
    `by_uuid_finds_mig` False: a driver whose GetHandleByUUID knows only GPUs."""

    NVMLError = FakeNvmlError
    NVML_DEVICE_MIG_ENABLE = 1
    GIB = 2**30

    def __init__(self, mig: bool = False, by_uuid_finds_mig: bool = True) -> None:
        self.mig = mig
        self.by_uuid_finds_mig = by_uuid_finds_mig
        self.asked: list[int] = []
        self.slices = ["MIG-a", "MIG-b"] if mig else []

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.asked.append(index)
        return f"GPU-{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid in ("GPU-0", "GPU-1") or (uuid in self.slices and self.by_uuid_finds_mig):
            return uuid
        raise FakeNvmlError("Not Found")

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return handle

    def nvmlDeviceGetMigMode(self, handle: str) -> list[int]:
        if handle.startswith("MIG-") or not self.mig:
            raise FakeNvmlError("Not Supported")
        return [1, 1] if handle == "GPU-0" else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:
        return 7 if self.mig and handle == "GPU-0" else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, index: int) -> str:
        if handle == "GPU-0" and index < len(self.slices):
            return self.slices[index]
        raise FakeNvmlError("Not Found")

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        if handle.startswith("MIG-"):
            return SimpleNamespace(used=2 * self.GIB, total=10 * self.GIB)
        return SimpleNamespace(used=3 * self.GIB, total=16 * self.GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if handle.startswith("MIG-") or (self.mig and handle == "GPU-0"):
            raise FakeNvmlError("Not Supported")
        return SimpleNamespace(gpu=42, memory=10)


def gpu_samples(collector: GpuCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        sample.name: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.labels == {"gpu": str(collector.device_index)}
    }


def test_gpu_collector_reports_memory_and_utilisation() -> None:
    nvml = FakeNvml()
    collector = GpuCollector(1, nvml, env={})
    assert nvml.asked == [1]
    assert gpu_samples(collector) == {
        "resnet_gpu_memory_used_bytes": 3 * 2**30,
        "resnet_gpu_memory_total_bytes": 16 * 2**30,
        "resnet_gpu_utilization_ratio": 0.42,
    }


MIG_SLICE_MEMORY = {
    "resnet_gpu_memory_used_bytes": 2 * 2**30,
    "resnet_gpu_memory_total_bytes": 10 * 2**30,
}


@pytest.mark.parametrize(
    "env",
    [
        {"NVIDIA_VISIBLE_DEVICES": "MIG-b"},  # the device plugin's mixed strategy
        {"CUDA_VISIBLE_DEVICES": "MIG-b", "NVIDIA_VISIBLE_DEVICES": "all"},
    ],
)
@pytest.mark.parametrize("by_uuid_finds_mig", [True, False])
def test_gpu_collector_on_a_mig_slice_reports_its_memory_and_no_utilisation(
    env: dict[str, str], by_uuid_finds_mig: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The handle is the slice the pod was given, not the parent GPU; utilisation, which
    NVML does not report on MIG, is left out and memory kept."""
    collector = GpuCollector(0, FakeNvml(mig=True, by_uuid_finds_mig=by_uuid_finds_mig), env)
    assert collector.is_mig
    caplog.clear()  # the one INFO line at construction says it is a slice
    with caplog.at_level(logging.DEBUG, logger="resnet_serve.metrics"):
        for _ in range(3):  # every scrape: no failed read, so not a line logged
            assert gpu_samples(collector) == MIG_SLICE_MEMORY
    assert not caplog.records


def test_gpu_collector_on_a_mig_gpu_without_uuids_uses_the_first_slice() -> None:
    """No UUID in the environment (a bare host, CUDA_VISIBLE_DEVICES unset): CUDA runs on
    the first MIG slice it sees, and so does the collector."""
    collector = GpuCollector(0, FakeNvml(mig=True), env={})
    assert collector.is_mig
    assert gpu_samples(collector) == MIG_SLICE_MEMORY


def test_gpu_collector_follows_the_visible_devices() -> None:
    nvml = FakeNvml()
    assert GpuCollector(0, nvml, env={"CUDA_VISIBLE_DEVICES": "1"})._handle == "GPU-1"
    assert GpuCollector(1, nvml, env={"NVIDIA_VISIBLE_DEVICES": "GPU-0,GPU-1"})._handle == "GPU-1"
    assert GpuCollector(0, nvml, env={"NVIDIA_VISIBLE_DEVICES": "all"})._handle == "GPU-0"


def test_a_failing_read_drops_only_its_series_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = FakeNvml()
    collector = GpuCollector(0, nvml, env={})

    def broken(handle: str) -> SimpleNamespace:
        raise FakeNvmlError("GPU is lost")

    nvml.nvmlDeviceGetUtilizationRates = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="resnet_serve.metrics"):
        for _ in range(3):
            assert set(gpu_samples(collector)) == set(MIG_SLICE_MEMORY)
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "GPU is lost" in caplog.records[0].getMessage()


def nvml_sees_a_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return bool(pynvml.nvmlDeviceGetCount() > 0)
    except Exception:  # no nvidia-ml-py, no driver
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not nvml_sees_a_gpu(), reason="no GPU visible to NVML")
def test_gpu_collector_reads_the_real_gpu() -> None:
    """The real NVML: memory always, utilisation unless the device is a MIG slice."""
    collector = gpu_metrics.gpu_collector(0)
    assert collector is not None
    samples = gpu_samples(collector)
    assert samples["resnet_gpu_memory_total_bytes"] > 2**30
    assert 0 < samples["resnet_gpu_memory_used_bytes"] <= samples["resnet_gpu_memory_total_bytes"]
    if collector.is_mig:
        assert "resnet_gpu_utilization_ratio" not in samples
    else:
        assert 0 <= samples["resnet_gpu_utilization_ratio"] <= 1


def test_gpu_series_appear_only_when_the_model_runs_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        metrics_module, "gpu_collector", lambda index: GpuCollector(index, FakeNvml(), env={})
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
