"""How many processes serve when `--workers` is not set: chosen from what the engine costs.

The split (one engine process, N front-ends) pays where the front-end's work (HTTP and
decoding) is a large share of each request: a model that costs microseconds, or one on a
GPU, where one process's event loop and GIL cap the whole server. Where a CPU model
dominates, the front-ends mostly wait, and on a small pod their processes only contend
with the engine for the same cores: on 2 CPUs with ResNet-50 INT8 the split left
saturation as it was and made the open-loop p99 worse (docs/benchmarks.md, "Processes").

So on the CPU the engine is opened here first and a lone image is timed. If every engine
instance together cannot do more than `ONE_PROCESS_MAX_IMAGES_S` images a second, far
below what one process's front-end serves, everything runs in this one process, on the
engine already opened; otherwise the engine is closed and the supervisor starts the split
(the engine process opens it again). On a GPU provider nothing is timed: the split.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from service.config import Settings
from service.cpus import auto_workers, cpu_limit
from service.engine.loading import Engine, EngineFactory, load_engine
from service.engine.onnx_engine import GPU_PROVIDERS, resolve_providers
from service.model_package import ModelPackage, Precision

# One process served about 270 req/s of JPEG photos with a cheap engine on 2 CPUs
# (docs/benchmarks.md); an engine that does at most this many leaves its event loop and
# GIL mostly idle, and the split would only add processes.
ONE_PROCESS_MAX_IMAGES_S = 100.0


@dataclass(frozen=True)
class Layout:
    """`workers` front-end processes (0: one process); `reason`, for the log and /info;
    `engine_factory`: hands over the engine opened to time it, when one process serves."""

    workers: int
    reason: str
    engine_factory: EngineFactory | None = None


def choose_layout(
    settings: Settings, package: ModelPackage, open_engine: EngineFactory = load_engine
) -> Layout:
    """`open_engine`: `load_engine` unless a test gives its own."""
    if settings.workers is not None:
        return Layout(settings.workers, "--workers set")
    limit = cpu_limit()
    if limit.whole <= 1:
        return Layout(0, f"automatic: {limit.cpus:g} CPU, one process")
    split = auto_workers(limit)
    if _on_gpu(settings):
        return Layout(split, f"automatic: a GPU provider, {split} front-end(s) decode beside it")
    started = time.perf_counter()
    try:
        opened = open_engine(settings, package)
    except Exception as exc:  # the engine process meets it again, and reports it as always
        return Layout(split, f"automatic: the engine could not be opened to time it ({exc})")
    ms_per_image, device = opened[0].warm_up([1]), opened[0].device
    if device == "cpu" and ms_per_image:
        instances = settings.thread_plan().instances
        images_s = instances * 1000 / ms_per_image
        timed = (
            f"automatic: the engine does about {images_s:.0f} img/s on {instances} "
            f"instance(s) ({ms_per_image:.3g} ms a lone image; timed in "
            f"{time.perf_counter() - started:.1f} s)"
        )
        if images_s <= ONE_PROCESS_MAX_IMAGES_S:
            return Layout(0, f"{timed}, at most {ONE_PROCESS_MAX_IMAGES_S:g}: one process",
                          _reuse(opened))  # fmt: skip
        reason = f"{timed}, more than {ONE_PROCESS_MAX_IMAGES_S:g}: {split} front-end(s)"
    else:
        reason = f"automatic: the engine runs on {device}, {split} front-end(s)"
    del opened  # the sessions and their memory, before the engine process opens its own
    gc.collect()
    return Layout(split, reason)


def _on_gpu(settings: Settings) -> bool:
    if settings.runtime != "onnxruntime":
        return False  # OpenVINO runs on the CPU
    return bool(GPU_PROVIDERS.intersection(resolve_providers(settings.providers)))


def _reuse(opened: tuple[Engine, Precision, list[str]]) -> EngineFactory:
    """The engine already opened, handed to the one process's runtime once."""
    holder = [opened]

    def factory(settings: Settings, package: ModelPackage) -> tuple[Engine, Precision, list[str]]:
        return holder.pop()

    return factory
