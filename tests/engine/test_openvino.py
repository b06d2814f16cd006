"""`--runtime openvino`: OpenVINO's outputs against ONNX Runtime's within the export's
tolerances (FP32, INT8, FP16), the engine's contract (shapes, dtypes, streams, the solo
model, the compiled-model cache) and the service serving on it. Skipped where the
openvino extra is not installed, except the one-line error that says so.

Known hazard: `pytest tests/engine tests/deploy` (this order) died of SIGSEGV in the first
helm call of tests/deploy (helm-python-sdk's Go library) after these tests had run in the
same process; the default order (tests/deploy first) and each suite alone pass."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from model_export import verify
from service import cli
from service.config import Settings
from service.engine import runtimes
from service.engine.onnx_engine import CPU, EngineOptions, InferenceEngine
from service.frontend.app import create_app
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage, Precision
from tests.support import metric_value, running_server

if TYPE_CHECKING:
    from service.engine.openvino_engine import OpenVinoEngine

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="the openvino extra is not installed"
)
Outputs = tuple[np.ndarray, np.ndarray]


def openvino_engine(path: Path, **options: Any) -> OpenVinoEngine:
    from service.engine.openvino_engine import OpenVinoEngine, OpenVinoOptions

    return OpenVinoEngine(path, OpenVinoOptions(**options))


@pytest.fixture(scope="module")
def input_sets(resnet18_package: Path, photo_jpegs: dict[str, bytes]) -> list[verify.InputSet]:
    spec = ModelPackage.load(resnet18_package).manifest.preprocessing
    preprocess = ImagePreprocessor(spec, 50_000_000)
    photos = np.stack([preprocess(body) for body in photo_jpegs.values()])
    noise = np.random.default_rng(7).integers(0, 256, (4, 224, 224, 3), np.uint8)
    return [verify.InputSet("photos", photos), verify.InputSet("random", noise)]


def onnxruntime_runner(path: Path) -> Callable[[np.ndarray], Outputs]:
    engine = InferenceEngine(path, EngineOptions(providers=[CPU], intra_op_threads=2))
    return engine.run


@needs_openvino
@pytest.mark.parametrize(
    ("package", "file", "precision"),
    [
        ("resnet18_package", "model.onnx", Precision.FP32),
        ("resnet18_package", "model.int8.onnx", Precision.INT8),
        ("resnet18_fp16_package", "model.fp16.onnx", Precision.FP16),
    ],
)
def test_openvino_agrees_with_onnxruntime_within_the_export_tolerances(
    package: str,
    file: str,
    precision: Precision,
    input_sets: list[verify.InputSet],
    request: pytest.FixtureRequest,
) -> None:
    """The same graph on both runtimes, at batch 1 and 8, on photos and random pixels,
    held to the tolerances the export holds that precision to."""
    path = request.getfixturevalue(package) / file
    engine = openvino_engine(path, instances=1, threads=2)
    report = verify.verify(engine.run, onnxruntime_runner(path), input_sets, precision, "ort")
    assert report.passed, verify.failure_summary(report)


@needs_openvino
def test_openvino_int8_holds_the_export_bound_against_fp32(
    resnet18_package: Path, input_sets: list[verify.InputSet]
) -> None:
    """What the export checks of ONNX Runtime's INT8 (against the FP32 graph) holds for
    OpenVINO's INT8 too."""
    engine = openvino_engine(resnet18_package / "model.int8.onnx", instances=1, threads=2)
    reference = onnxruntime_runner(resnet18_package / "model.onnx")
    report = verify.verify(engine.run, reference, input_sets, Precision.INT8, "fp32-onnx")
    assert report.passed, verify.failure_summary(report)


@needs_openvino
def test_the_engine_has_the_onnxruntime_engines_shapes_dtypes_and_plan(
    resnet18_package: Path, input_sets: list[verify.InputSet]
) -> None:
    path = resnet18_package / "model.onnx"
    engine = openvino_engine(path, instances=2, threads=1, solo_threads=2)
    ort_engine = InferenceEngine(path, EngineOptions(providers=[CPU]))
    assert (engine.runtime, engine.device, engine.providers) == ("openvino", "cpu", ["CPU"])
    assert engine.input_shape == ort_engine.input_shape == (224, 224, 3)
    pixels = input_sets[0].pixels[:3]
    for got, expected in zip(engine.run(pixels), ort_engine.run(pixels), strict=True):
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype) == (got.shape, np.float32)
    # Two streams of one thread for the instances; one of two threads for a lone batch;
    # FP32 computed in f32 (OpenVINO's default would be BF16 on CPUs it deems able).
    assert engine.has_solo_session
    for solo, streams, threads in ((False, 2, 2), (True, 1, 2)):
        assert int(engine.property("NUM_STREAMS", solo)) == streams
        assert engine.property("INFERENCE_NUM_THREADS", solo) == threads
        assert str(engine.property("INFERENCE_PRECISION_HINT", solo)) == "<Type: 'float32'>"
        assert engine.property("ENABLE_CPU_PINNING", solo) is False
    alone_logits, _ = engine.run(pixels, alone=True)
    assert verify.cosines(alone_logits, engine.run(pixels)[0]).min() > 0.99999
    assert engine.warm_up([1, 2]) > 0


@needs_openvino
def test_more_callers_than_instances_each_get_their_own_results(resnet18_package: Path) -> None:
    engine = openvino_engine(resnet18_package / "model.onnx", instances=2, threads=1)
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (1 + i % 3, 224, 224, 3), np.uint8) for i in range(12)]
    serial = [engine.run(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        overlapped = list(pool.map(engine.run, batches))
    for (logits, _), (expected, _) in zip(overlapped, serial, strict=True):
        assert verify.cosines(logits, expected).min() > 0.99999


@needs_openvino
def test_compiled_models_are_cached_and_an_unwritable_cache_only_costs_the_compile(
    resnet18_package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = resnet18_package / "model.onnx"
    cache = tmp_path / "cache"
    first = openvino_engine(path, cache_dir=cache)
    assert first.property("LOADED_FROM_CACHE") is False
    assert any(cache.iterdir())
    second = openvino_engine(path, cache_dir=cache)
    assert second.property("LOADED_FROM_CACHE") is True
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, "resnet_serve.engine"):
        uncached = openvino_engine(path, cache_dir=tmp_path / "a-file" / "cache")
    assert uncached.cache_dir is None
    assert "OpenVINO model cache off" in caplog.text
    assert uncached.run(np.zeros((1, 224, 224, 3), np.uint8))[0].shape == (1, 1000)


@needs_openvino
def test_the_service_serves_on_openvino_and_says_so(
    resnet18_package: Path, photo_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    settings = Settings(
        model_dir=resnet18_package,
        runtime="openvino",
        precision="int8",
        openvino_cache_dir=tmp_path / "cache",
    )
    spec = ModelPackage.load(resnet18_package).manifest.preprocessing
    preprocess = ImagePreprocessor(spec, 50_000_000)
    reference = InferenceEngine(resnet18_package / "model.int8.onnx", EngineOptions([CPU]))
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        serving = http.get("/info").json()["serving"]
        assert (serving["runtime"], serving["precision"]) == ("openvino", "int8")
        assert serving["execution_providers"] == ["CPU"]
        agree = 0
        for body in photo_jpegs.values():
            answer = http.post("/embed", content=body, headers={"content-type": "image/jpeg"})
            assert answer.status_code == 200, answer.text
            vector = np.asarray(answer.json()["embeddings"][0], dtype=np.float32)
            _, expected = reference.run(preprocess(body)[None])
            agree += verify.cosines(vector[None], expected)[0] > 0.98
        assert agree == len(photo_jpegs)
        assert http.get("/v2/models/resnet18").json()["platform"] == "openvino"
        metrics = http.get("/metrics").text
    assert metric_value(metrics, "resnet_model_info", {"runtime": "openvino"}) == 1
    assert any((tmp_path / "cache").iterdir())


def test_openvino_takes_no_onnxruntime_providers(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="leave them at 'auto'"):
        Settings(model_dir=tmp_path, runtime="openvino", providers="CPUExecutionProvider")


def test_asking_for_openvino_without_the_extra_fails_in_one_line(
    resnet18_package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        runtimes.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "openvino" else real(name, *args),
    )
    code = cli.main(["--model-dir", str(resnet18_package), "--runtime", "openvino"])
    assert code == cli.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "resnet-serve[openvino]" in err
    assert err.startswith("resnet-serve: error: --runtime openvino needs the openvino package")
