"""GPU memory and utilisation in /metrics, read through NVML (`nvidia-ml-py`).

Registered only when the model runs on CUDA; without `nvidia-ml-py`, without a driver, or
on a CPU, the series are absent rather than zero, so a CPU pod never looks like an idle GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("resnet_serve.metrics")


class GpuCollector(Collector):
    """Reads NVML at every scrape (a few microseconds per GPU) for one device index."""

    def __init__(self, device_index: int, nvml: Any) -> None:
        self.device_index = device_index
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        labels = [str(self.device_index)]
        used = GaugeMetricFamily(
            "resnet_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "resnet_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"]
        )
        util = GaugeMetricFamily(
            "resnet_gpu_utilization_ratio",
            "fraction of the last sample period in which a kernel ran on the GPU (0-1)",
            labels=["gpu"],
        )
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
            rates = nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception as exc:  # a failing GPU must not break /metrics
            log.warning("NVML read failed: %s", exc)
            return
        used.add_metric(labels, float(memory.used))
        total.add_metric(labels, float(memory.total))
        util.add_metric(labels, rates.gpu / 100.0)
        yield used
        yield total
        yield util


def gpu_collector(device_index: int) -> GpuCollector | None:
    """A collector for GPU `device_index`, or None (with a log line) when NVML is missing."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return GpuCollector(device_index, pynvml)
    except Exception as exc:  # ImportError, or NVMLError: no driver / no such device
        log.warning("GPU metrics unavailable (nvidia-ml-py / NVML): %s", exc)
        return None
