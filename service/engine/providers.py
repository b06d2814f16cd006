"""The execution providers a session was asked for against those it actually got.

ONNX Runtime does not fail when CUDA cannot be initialised (no GPU or driver, a CUDA or
cuDNN major version the build was not made for, a library missing): the C++ core logs an
error and leaves the provider out, and the Python API prints "EP Error ... Falling back to
['CPUExecutionProvider']" and retries on the CPU. Either way the session runs on the CPU,
and only `InferenceSession.get_providers()` says so. The service checks it after every
load, so a GPU pod that lost its GPU says so (log, /info, /metrics) and never serves the
FP16 variant, which is only worth serving on a GPU, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from service.engine.onnx_engine import GPU_PROVIDERS, choose_variant
from service.model_package import ModelPackage, Precision


@dataclass(frozen=True)
class ProviderReport:
    """`requested`: the providers the session was created with (`auto` resolved);
    `active`: `session.get_providers()`."""

    requested: tuple[str, ...]
    active: tuple[str, ...]

    @property
    def gpus_requested(self) -> list[str]:
        return [name for name in self.requested if name in GPU_PROVIDERS]

    @property
    def gpu_fallback(self) -> bool:
        """A GPU provider was asked for and the session got none."""
        return bool(self.gpus_requested) and not GPU_PROVIDERS.intersection(self.active)

    @property
    def reason(self) -> str | None:
        if not self.gpu_fallback:
            return None
        return (
            f"{', '.join(self.gpus_requested)} was requested but the session runs on "
            f"{', '.join(self.active)}: ONNX Runtime could not initialise the GPU (no GPU or "
            "driver, a CUDA or cuDNN version this onnxruntime-gpu build does not support, or "
            "a CUDA library missing; its own error message above says which)"
        )


def check_providers(requested: Sequence[str], active: Sequence[str]) -> ProviderReport:
    return ProviderReport(tuple(requested), tuple(active))


class _HasProviders(Protocol):
    providers: list[str]


EngineT = TypeVar("EngineT", bound=_HasProviders)


def open_variant(
    package: ModelPackage,
    requested: Precision,
    providers: Sequence[str],
    open_engine: Callable[[Path], EngineT],
) -> tuple[EngineT, Precision, list[str]]:
    """Open the variant for `providers`; if the session fell back from the GPU to the CPU,
    choose again for the providers it got and re-open when that changes the variant (FP16
    becomes FP32). Returns the engine, the precision served and the warnings to log: a
    fallback adds exactly one."""
    precision, path, warnings = choose_variant(package, requested, providers)
    package.verify(precision)  # the graph is the one the manifest's SHA-256 names
    engine = open_engine(path)
    report = check_providers(providers, engine.providers)
    if report.reason is None:
        return engine, precision, warnings
    message = report.reason
    actual, actual_path, _ = choose_variant(package, requested, engine.providers)
    if actual is not precision:
        message += f"; serving {actual} instead of {precision}, which is slower on a CPU"
        del engine  # release the first session before the second one allocates
        package.verify(actual)
        engine = open_engine(actual_path)
    return engine, actual, [*warnings, message]
