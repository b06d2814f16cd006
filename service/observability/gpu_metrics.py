"""GPU memory and utilisation in /metrics, read through NVML (`nvidia-ml-py`).

Registered only when the model runs on CUDA; without `nvidia-ml-py`, without a driver, or
on a CPU, the series are absent rather than zero, so a CPU pod never looks like an idle GPU.

The device is the one CUDA gives the engine: the `device_id`-th entry of
CUDA_VISIBLE_DEVICES (or, in a container, NVIDIA_VISIBLE_DEVICES, which the Kubernetes
device plugin sets to the GPU's or MIG slice's UUID). On a MIG-partitioned GPU that is the
slice, not the parent GPU: memory is the slice's, and utilisation, which NVML does not
report for MIG devices, is left out while memory is still reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("resnet_serve.metrics")

UUID_PREFIXES = ("GPU-", "MIG-")


def visible_device(device_index: int, env: Mapping[str, str]) -> str | None:
    """The entry naming CUDA device `device_index` in CUDA_VISIBLE_DEVICES, else in
    NVIDIA_VISIBLE_DEVICES (a UUID or an index), or None when neither lists it."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        entries = [entry.strip() for entry in env.get(name, "").split(",") if entry.strip()]
        if entries and entries[0] not in ("all", "none", "void"):
            return entries[device_index] if device_index < len(entries) else None
    return None


def _mig_slices(nvml: Any, parent: Any) -> Iterator[Any]:
    """The MIG devices of `parent` this process can see, in NVML's order."""
    for index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            yield nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, index)
        except nvml.NVMLError:  # NOT_FOUND: no slice there, or not ours
            continue


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
        return False
    return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)


def _by_uuid(nvml: Any, uuid: str) -> Any:
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except nvml.NVMLError:
        if not uuid.startswith("MIG-"):
            raise
    for index in range(nvml.nvmlDeviceGetCount()):  # a driver that looks up GPUs only
        for mig in _mig_slices(nvml, nvml.nvmlDeviceGetHandleByIndex(index)):
            if nvml.nvmlDeviceGetUUID(mig) == uuid:
                return mig
    raise LookupError(f"no MIG device {uuid} visible to NVML")


def device_handle(nvml: Any, device_index: int, env: Mapping[str, str]) -> tuple[Any, bool]:
    """The NVML handle of CUDA device `device_index`, and whether it is a MIG slice."""
    entry = visible_device(device_index, env)
    if entry is not None and entry.startswith(UUID_PREFIXES):
        return _by_uuid(nvml, entry), entry.startswith("MIG-")
    nvml_index = int(entry) if entry is not None and entry.isdigit() else device_index
    handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
    if _mig_enabled(nvml, handle):
        # CUDA runs on one MIG slice, the first it can see (NVIDIA's MIG user guide).
        for mig in _mig_slices(nvml, handle):
            return mig, True
    return handle, False


class GpuCollector(Collector):
    """Reads NVML at every scrape (a few microseconds per GPU) for one device index. Memory
    and utilisation are read apart, so one that fails (utilisation on MIG) leaves the
    other; each failure is logged as a warning once, then at debug level."""

    def __init__(self, device_index: int, nvml: Any, env: Mapping[str, str] = os.environ) -> None:
        self.device_index = device_index
        self._nvml = nvml
        self._handle, self.is_mig = device_handle(nvml, device_index, env)
        self._failed: set[str] = set()
        if self.is_mig:
            log.info("GPU metrics: MIG slice (memory only: NVML has no utilisation for MIG)")

    def _read(self, what: str, read: Callable[[Any], Any]) -> Any | None:
        try:
            return read(self._handle)
        except Exception as exc:  # a failing GPU must not break /metrics
            level = logging.DEBUG if what in self._failed else logging.WARNING
            self._failed.add(what)
            log.log(level, "NVML %s read failed: %s", what, exc)
            return None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        labels = [str(self.device_index)]
        memory = self._read("memory", nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            used = GaugeMetricFamily(
                "resnet_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["gpu"]
            )
            total = GaugeMetricFamily(
                "resnet_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"]
            )
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
            yield used
            yield total
        if self.is_mig:
            return
        rates = self._read("utilisation", nvml.nvmlDeviceGetUtilizationRates)
        if rates is not None:
            util = GaugeMetricFamily(
                "resnet_gpu_utilization_ratio",
                "fraction of the last sample period in which a kernel ran on the GPU (0-1)",
                labels=["gpu"],
            )
            util.add_metric(labels, rates.gpu / 100.0)
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
