"""The CUDA path on a real GPU: the engine on the CUDA provider against the CPU, FP16 within
the export's tolerances, the service serving FP16 on the GPU, and batches that overlap on
one GPU session. Skipped where ONNX Runtime cannot use a GPU (CI has none); run with
`scripts/gpu/remote.sh test` on a GPU machine (docs/benchmarks.md, "GPU")."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_export import verify
from service.config import Settings
from service.engine.onnx_engine import CPU, CUDA, EngineOptions, InferenceEngine
from service.frontend.app import create_app
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage, Precision
from tests.support import cuda_usable, metric_value, running_server

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_usable(), reason="no usable CUDA GPU for ONNX Runtime"),
]


@pytest.fixture(scope="module")
def photo_pixels(resnet18_fp16_package: Path, photo_jpegs: dict[str, bytes]) -> np.ndarray:
    spec = ModelPackage.load(resnet18_fp16_package).manifest.preprocessing
    preprocess = ImagePreprocessor(spec, 50_000_000)
    return np.stack([preprocess(body) for body in photo_jpegs.values()])


def test_the_engine_runs_on_cuda_and_agrees_with_the_cpu(
    resnet18_fp16_package: Path, photo_pixels: np.ndarray
) -> None:
    path = resnet18_fp16_package / "model.onnx"
    gpu = InferenceEngine(path, EngineOptions(providers=[CUDA, CPU]))
    cpu = InferenceEngine(path, EngineOptions(providers=[CPU]))
    assert gpu.device == "cuda"
    assert gpu.providers[0] == CUDA
    expected_logits, expected_embedding = cpu.run(photo_pixels)
    for size in (1, len(photo_pixels)):
        logits, embedding = (
            np.concatenate(parts)
            for parts in zip(
                *(gpu.run(photo_pixels[i : i + size]) for i in range(0, len(photo_pixels), size)),
                strict=True,
            )
        )
        # FP32 convolutions on CUDA may use TF32 tensor cores: close, not bit-equal.
        assert verify.cosines(logits, expected_logits).min() > 0.9999
        assert verify.cosines(embedding, expected_embedding).min() > 0.9999
        assert (logits.argmax(1) == expected_logits.argmax(1)).all()


def test_fp16_on_cuda_is_within_the_export_tolerances_of_fp32(
    resnet18_fp16_package: Path, photo_pixels: np.ndarray
) -> None:
    fp16 = verify.fp16_runner(resnet18_fp16_package / "model.fp16.onnx")
    assert fp16.provider == CUDA
    fp32 = verify.onnx_runner(resnet18_fp16_package / "model.onnx")
    inputs = [
        verify.InputSet("photos", photo_pixels),
        verify.InputSet(
            "random", np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), np.uint8)
        ),
    ]
    report = verify.verify(fp16, fp32, inputs, Precision.FP16, "fp32-onnx", provider=fp16.provider)
    assert report.passed, verify.failure_summary(report)
    # ... and the export itself checked FP16 there, and says so.
    manifest = ModelPackage.load(resnet18_fp16_package).manifest
    assert manifest.variants[Precision.FP16].verification.provider == CUDA


def test_the_service_serves_fp16_on_the_gpu(
    resnet18_fp16_package: Path, photo_jpegs: dict[str, bytes], photo_pixels: np.ndarray
) -> None:
    app = create_app(Settings(model_dir=resnet18_fp16_package, precision="fp16"))
    reference = InferenceEngine(
        resnet18_fp16_package / "model.fp16.onnx", EngineOptions(providers=[CUDA, CPU])
    )
    expected_logits, expected_embedding = reference.run(photo_pixels)
    with running_server(app, timeout_s=300) as url, httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/info").json()
        assert info["serving"]["precision"] == "fp16"
        assert info["serving"]["device"] == "cuda"
        assert info["serving"]["gpu_fallback"] is False
        assert info["serving"]["verified_on"] == CUDA
        for index, body in enumerate(photo_jpegs.values()):
            answer = http.post(
                "/predict?top_k=5", content=body, headers={"content-type": "image/jpeg"}
            )
            assert answer.status_code == 200, answer.text
            top = [entry["index"] for entry in answer.json()["predictions"][0]]
            assert top[0] == int(expected_logits[index].argmax())
            embedded = http.post("/embed", content=body, headers={"content-type": "image/jpeg"})
            vector = np.asarray(embedded.json()["embeddings"][0], dtype=np.float32)
            assert verify.cosines(vector[None], expected_embedding[index][None])[0] > 0.999
        metrics = http.get("/metrics").text
    assert 'device="cuda"' in metrics
    assert 'gpu_fallback="false"' in metrics
    assert metric_value(metrics, "resnet_gpu_memory_used_bytes", {"gpu": "0"}) > 0


def test_batches_that_overlap_on_one_gpu_session_each_get_their_own_results(
    resnet18_fp16_package: Path,
) -> None:
    engine = InferenceEngine(
        resnet18_fp16_package / "model.fp16.onnx", EngineOptions(providers=[CUDA, CPU])
    )
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (1 + i % 8, 224, 224, 3), np.uint8) for i in range(48)]
    serial = [engine.run(batch) for batch in batches]
    with ThreadPoolExecutor(8) as pool:
        overlapped = list(pool.map(engine.run, batches))
    for (logits, embedding), (expected_logits, expected_embedding) in zip(
        overlapped, serial, strict=True
    ):
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(embedding, expected_embedding, rtol=1e-3, atol=1e-3)
