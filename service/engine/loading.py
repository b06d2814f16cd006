"""Opening the model for the runtime: the engine and the variant it serves, and what gets
reported about it once it is warm (the log lines and the model-info metrics). The
`Runtime` decides when; this module knows how."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.config import Settings
from service.cpus import ThreadPlan
from service.engine import runtimes
from service.engine.onnx_engine import CUDA, EngineOptions, InferenceEngine, resolve_providers
from service.engine.providers import ProviderReport, open_variant
from service.engine.runtimes import OPENVINO
from service.engine_api import DevicePolicy
from service.model_package import Manifest, ModelPackage, Precision
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")

Outputs = tuple[np.ndarray, np.ndarray]  # a batch's (logits, embeddings)


class Engine(Protocol):
    """What the runtime needs of an engine (the real ones, or a test double)."""

    runtime: str  # "onnxruntime", "openvino"
    runtime_version: str
    providers: list[str]  # what the session got
    providers_requested: list[str]  # what it was created with (`auto` resolved)
    device: str

    @property
    def has_solo_session(self) -> bool: ...  # a batch that runs alone gets every CPU

    def run(self, batch: np.ndarray, alone: bool = False) -> Outputs: ...
    # Returns a lone image's run time in ms once warm, where the engine measures it.
    def warm_up(self, batch_sizes: list[int]) -> float | None: ...


EngineFactory = Callable[[Settings, ModelPackage], tuple[Engine, Precision, list[str]]]


def load_engine(settings: Settings, package: ModelPackage) -> tuple[Engine, Precision, list[str]]:
    """The engine on the runtime the settings name."""
    if settings.runtime == OPENVINO:
        return load_openvino_engine(settings, package)
    return load_onnx_engine(settings, package)


def load_onnx_engine(
    settings: Settings, package: ModelPackage
) -> tuple[Engine, Precision, list[str]]:
    providers = resolve_providers(settings.providers)
    threads = settings.thread_plan(gpu=CUDA in providers)
    options = EngineOptions(
        providers=providers,
        device_id=settings.device_id,
        instances=threads.instances,
        intra_op_threads=threads.intra_op_threads,
        solo_threads=threads.solo_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=threads.spinning,
    )
    # The variant follows the providers the session got, not those asked for.
    return open_variant(
        package, settings.precision, providers, lambda path: InferenceEngine(path, options)
    )


def load_openvino_engine(
    settings: Settings, package: ModelPackage
) -> tuple[Engine, Precision, list[str]]:
    """OpenVINO on the CPU, with the CPU thread plan the ONNX Runtime engine would get.
    FP16 falls back to FP32 as it does on ONNX Runtime's CPU provider."""
    reason = runtimes.missing(OPENVINO)
    if reason is not None:
        raise RuntimeError(reason)
    from service.engine.openvino_engine import DEVICE, OpenVinoEngine, OpenVinoOptions

    threads = settings.thread_plan(gpu=False)
    options = OpenVinoOptions(
        instances=threads.instances,
        threads=threads.intra_op_threads,
        solo_threads=threads.solo_threads,
        cache_dir=settings.openvino_cache_dir or default_openvino_cache(),
    )
    return open_variant(
        package, settings.precision, [DEVICE], lambda path: OpenVinoEngine(path, options)
    )


def default_openvino_cache() -> Path:
    """In the temp directory: the one place a read-only container (the chart's) can write."""
    return Path(tempfile.gettempdir()) / "resnet-serve-openvino"


def record_load(
    metrics: ServiceMetrics,
    settings: Settings,
    manifest: Manifest,
    precision: Precision,
    engine: Engine,
    report: ProviderReport,
    load_s: float,
    warm_s: float,
) -> None:
    metrics.model_loaded(load_s, warm_s, engine.device, settings.device_id)
    metrics.model.info(
        {
            "name": manifest.name,
            "version": manifest.version,
            "arch": manifest.arch,
            "precision": str(precision),
            "trained": str(manifest.trained).lower(),
            "device": engine.device,
            "runtime": engine.runtime,
            "providers": ",".join(engine.providers),
            "gpu_fallback": str(report.gpu_fallback).lower(),
        }
    )


def log_load(
    manifest: Manifest,
    precision: Precision,
    engine: Engine,
    sizes: list[int],
    load_s: float,
    warm_s: float,
) -> None:
    log.info(
        "loaded %s v%s (%s, %s, %s) on %s %s (%s) in %.1f s, warm-up over batch sizes %s in %.1f s",
        manifest.name,
        manifest.version,
        manifest.arch,
        precision,
        "trained" if manifest.trained else "UNTRAINED",
        engine.runtime,
        engine.runtime_version,
        ", ".join(engine.providers),
        load_s,
        sizes,
        warm_s,
    )


def log_plan(plan: ThreadPlan, policy: DevicePolicy, device: str, runtime: str) -> None:
    log.info(
        "threads: %g CPU(s) available (%s); %d engine instance(s) of %d %s "
        "thread(s)%s%s; %d batch(es) at once, busy batches of up to %d "
        "(a lone image runs in %s ms); %d decode worker(s)",
        plan.limit.cpus,
        plan.limit.source,
        plan.instances,
        plan.intra_op_threads,
        runtime,
        f" and a {plan.solo_threads}-thread session for lone batches"
        if plan.solo_threads > plan.intra_op_threads and device == "cpu"
        else "",
        f", spinning {'on' if plan.spinning else 'off'}" if runtime == "onnxruntime" else "",
        policy.concurrent_batches,
        policy.busy_batch_size,
        "?" if policy.engine_ms_per_image is None else f"{policy.engine_ms_per_image:.2f}",
        plan.decode_workers,
    )
