"""The GPU path without a GPU: a session asked for CUDA that got only the CPU, as ONNX
Runtime does when CUDA cannot start, is noticed and never serves FP16; `auto` follows what
the ONNX Runtime build offers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import onnxruntime as ort
import pytest

from service.config import Settings
from service.engine.onnx_engine import CPU, CUDA, GPU_PROVIDERS, resolve_providers
from service.engine.providers import check_providers, open_variant
from service.frontend.app import create_app
from service.model_package import ModelPackage, Precision
from tests.support import metric_value, png, running_server

CUDA_BUILD = [CUDA, CPU]  # what onnxruntime-gpu reports, GPU or not


def test_auto_follows_the_onnx_runtime_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert resolve_providers(["auto"]) == [CPU]
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", *CUDA_BUILD]
    )
    assert resolve_providers(["auto"]) == [CUDA, CPU]
    with pytest.raises(ValueError, match="not in this ONNX Runtime build"):
        resolve_providers(["NoSuchExecutionProvider"])


@pytest.mark.parametrize(
    ("requested", "active", "fallback"),
    [
        ([CPU], [CPU], False),
        ([CUDA, CPU], [CUDA, CPU], False),
        ([CUDA, CPU], [CPU], True),
        ([CUDA], [CPU], True),
        (["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU], False),  # still on the GPU
    ],
)
def test_gpu_fallback_is_a_gpu_asked_for_and_none_got(
    requested: list[str], active: list[str], fallback: bool
) -> None:
    report = check_providers(requested, active)
    assert report.gpu_fallback is fallback
    assert (report.reason is not None) is fallback
    if fallback:
        assert report.reason is not None
        assert f"{CUDA} was requested but the session runs on {CPU}" in report.reason


@dataclass
class Opened:
    """A stand-in engine: only what `open_variant` reads."""

    path: Path
    providers: list[str]


@dataclass
class Opener:
    active: list[str]
    paths: list[str] = field(default_factory=list)

    def __call__(self, path: Path) -> Opened:
        self.paths.append(path.name)
        return Opened(path, self.active)


@pytest.mark.parametrize(
    ("precision", "active", "served", "opened"),
    [
        (Precision.FP16, CUDA_BUILD, Precision.FP16, ["model.fp16.onnx"]),
        (Precision.FP16, [CPU], Precision.FP32, ["model.fp16.onnx", "model.onnx"]),
        (Precision.FP32, [CPU], Precision.FP32, ["model.onnx"]),
    ],
)
def test_the_variant_follows_the_providers_the_session_got(
    resnet18_fp16_package: Path,
    precision: Precision,
    active: list[str],
    served: Precision,
    opened: list[str],
) -> None:
    package = ModelPackage.load(resnet18_fp16_package)
    opener = Opener(active)
    engine, got, warnings = open_variant(package, precision, CUDA_BUILD, opener)
    assert got is served
    assert opener.paths == opened
    assert engine.path.name == opened[-1]
    lost_gpu = not GPU_PROVIDERS.intersection(active)
    assert len(warnings) == (1 if lost_gpu else 0), warnings
    if lost_gpu and served is not precision:
        assert "serving fp32 instead of fp16" in warnings[0]


class CudaFailsSession(ort.InferenceSession):
    """What ONNX Runtime does when CUDA cannot start: the session is created anyway, on the
    providers that could be, and `get_providers()` is the only sign."""

    opened: ClassVar[list[tuple[str, list[str]]]] = []

    def __init__(self, path: str, options: Any = None, **kwargs: Any) -> None:
        providers = list(kwargs.pop("providers"))
        provider_options = list(kwargs.pop("provider_options", None) or [{}] * len(providers))
        CudaFailsSession.opened.append((Path(path).name, providers))
        keep = [i for i, name in enumerate(providers) if name not in GPU_PROVIDERS]
        super().__init__(
            path,
            options,
            providers=[providers[i] for i in keep],
            provider_options=[provider_options[i] for i in keep],
            **kwargs,
        )


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def lost_gpu(resnet18_fp16_package: Path) -> Iterator[tuple[httpx.Client, Records]]:
    """The real service asked for FP16 on a CUDA build of ONNX Runtime whose CUDA fails."""
    records = Records()
    logger = logging.getLogger("resnet_serve")
    logger.addHandler(records)
    CudaFailsSession.opened.clear()
    settings = Settings(model_dir=resnet18_fp16_package, precision="fp16", max_batch_size=2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ort, "get_available_providers", lambda: list(CUDA_BUILD))
            patch.setattr(ort, "InferenceSession", CudaFailsSession)
            with (
                running_server(create_app(settings)) as url,
                httpx.Client(base_url=url, timeout=60) as client,
            ):
                yield client, records
    finally:
        logger.removeHandler(records)


def test_lost_gpu_is_reported_in_info_and_fp32_is_served(
    lost_gpu: tuple[httpx.Client, Records],
) -> None:
    client, _ = lost_gpu
    serving = client.get("/info").json()["serving"]
    assert serving["requested_precision"] == "fp16"
    assert serving["precision"] == "fp32"
    assert serving["file"] == "model.onnx"
    assert serving["providers_requested"] == [CUDA, CPU]
    assert serving["execution_providers"] == [CPU]
    assert serving["device"] == "cpu"
    assert serving["gpu_fallback"] is True
    assert "CUDAExecutionProvider was requested" in serving["gpu_fallback_reason"]
    assert any("serving fp32 instead of fp16" in warning for warning in serving["warnings"])
    # FP16 was opened first, asking for CUDA, then FP32 (the engine may open several
    # sessions of each: one per instance).
    names = [name for name, _ in CudaFailsSession.opened]
    first_fp32 = names.index("model.onnx")
    assert first_fp32 > 0
    assert set(names[:first_fp32]) == {"model.fp16.onnx"}
    assert set(names[first_fp32:]) == {"model.onnx"}
    assert all(CUDA in providers for _, providers in CudaFailsSession.opened)
    response = client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["precision"] == "fp32"


def test_lost_gpu_is_one_warning_and_a_metric_label(
    lost_gpu: tuple[httpx.Client, Records],
) -> None:
    client, records = lost_gpu
    about_cuda = [r for r in records.records if CUDA in r.getMessage()]
    assert len(about_cuda) == 1, [r.getMessage() for r in records.records]
    assert about_cuda[0].levelno == logging.WARNING
    text = client.get("/metrics").text
    labels = {"gpu_fallback": "true", "precision": "fp32", "device": "cpu", "providers": CPU}
    assert metric_value(text, "resnet_model_info", labels) == 1
