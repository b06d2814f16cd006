"""The service through a real uvicorn server over HTTP, on a real exported ResNet package."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI

from service.config import Settings
from service.frontend.app import create_app
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from tests.support import metric_value, running_server


class Reference:
    """The ONNX graph run directly on the service's own preprocessing of the same bytes."""

    def __init__(self, package_dir: Path) -> None:
        package = ModelPackage.load(package_dir)
        self.labels = package.labels
        self.preprocess = ImagePreprocessor(package.manifest.preprocessing, 50_000_000)
        self.session = ort.InferenceSession(
            str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )

    def outputs(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.stack([self.preprocess(data) for data in images])
        logits, embedding = self.session.run(["logits", "embedding"], {"images": pixels})
        return logits, embedding

    def top_k(self, data: bytes, k: int) -> tuple[list[int], np.ndarray]:
        logits = self.outputs([data])[0][0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [int(i) for i in order], probabilities[order]


@pytest.fixture(scope="module")
def reference(resnet18_package: Path) -> Reference:
    return Reference(resnet18_package)


@pytest.fixture(scope="module", params=[False, True], ids=["decode-in-batch", "overlap-decode"])
def served(request: pytest.FixtureRequest, resnet18_package: Path) -> Iterator[tuple[str, FastAPI]]:
    """The real service, decoding as part of each batch (the CPU default) or ahead of it
    while other batches run (the GPU default)."""
    settings = Settings(
        model_dir=resnet18_package,
        precision="fp32",
        max_batch_size=8,
        busy_batch_size=8,  # batches of several images (on 2 CPUs the default takes one)
        overlap_decode=request.param,
        # The reference runs on the CPU and answers must equal it to 1e-4; on a CUDA host
        # `auto` would serve with TF32 convolutions (tests/engine/test_cuda.py covers the GPU).
        providers=["CPUExecutionProvider"],
    )
    app = create_app(settings)
    with running_server(app) as url:
        assert app.state.runtime.decode_in_batch is not request.param
        yield url, app


@pytest.fixture
def client(served: tuple[str, FastAPI]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as http:
        yield http


def assert_predictions_match(body: dict, data: bytes, reference: Reference, k: int) -> None:
    indices, scores = reference.top_k(data, k)
    got = body
    assert [p["index"] for p in got] == indices
    assert [p["label"] for p in got] == [reference.labels[i] for i in indices]
    np.testing.assert_allclose([p["score"] for p in got], scores, rtol=1e-4, atol=1e-6)


def test_predict_raw_body_matches_graph(
    client: httpx.Client, photo_jpegs: dict[str, bytes], reference: Reference
) -> None:
    for data in photo_jpegs.values():
        response = client.post(
            "/predict?top_k=5", content=data, headers={"content-type": "image/jpeg"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {
            "name": "resnet18",
            "version": "1",
            "precision": "fp32",
            "trained": False,
        }
        assert len(body["predictions"]) == 1
        assert_predictions_match(body["predictions"][0], data, reference, 5)
        assert "infer;dur=" in response.headers["server-timing"]


def test_predict_multipart_and_json_in_request_order(
    client: httpx.Client, photo_jpegs: dict[str, bytes], reference: Reference
) -> None:
    images = list(photo_jpegs.values())
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    multipart = client.post("/predict", files=files, data={"top_k": "3"})
    assert multipart.status_code == 200, multipart.text
    as_json = client.post(
        "/predict", json={"images": [base64.b64encode(d).decode() for d in images], "top_k": 3}
    )
    assert as_json.status_code == 200, as_json.text
    for response in (multipart, as_json):
        predictions = response.json()["predictions"]
        assert len(predictions) == len(images)
        for got, data in zip(predictions, images, strict=True):
            assert_predictions_match(got, data, reference, 3)


def test_embed_matches_graph(
    client: httpx.Client, photo_jpegs: dict[str, bytes], reference: Reference
) -> None:
    images = list(photo_jpegs.values())[:3]
    _, expected = reference.outputs(images)
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]

    normalized = client.post("/embed", files=files)
    assert normalized.status_code == 200, normalized.text
    body = normalized.json()
    assert body["dim"] == 512
    assert body["normalized"] is True
    assert body["encoding"] == "json"
    vectors = np.array(body["embeddings"], dtype=np.float32)
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, unit, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    raw = client.post("/embed?normalize=false", files=files).json()
    np.testing.assert_allclose(np.array(raw["embeddings"]), expected, rtol=1e-4, atol=1e-5)

    packed = client.post(
        "/embed",
        json={
            "images": [base64.b64encode(d).decode() for d in images],
            "encoding": "base64",
            "normalize": False,
        },
    ).json()
    assert packed["encoding"] == "base64"
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(text), dtype="<f4") for text in packed["embeddings"]]
    )
    np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-5)


def test_concurrent_mixed_requests_each_get_their_own_answer(
    served: tuple[str, FastAPI], distinct_jpegs: list[bytes], reference: Reference
) -> None:
    url, _ = served
    logits, embeddings = reference.outputs(distinct_jpegs)
    top1 = logits.argmax(axis=1)
    assert len(set(top1.tolist())) > 1 or len({round(float(v), 3) for v in embeddings[:, 0]}) > 1

    async def one(http: httpx.AsyncClient, index: int) -> None:
        image = index % len(distinct_jpegs)
        data = distinct_jpegs[image]
        headers = {"content-type": "image/jpeg"}
        if index % 2:
            response = await http.post("/embed?normalize=false", content=data, headers=headers)
            assert response.status_code == 200, response.text
            got = np.array(response.json()["embeddings"][0], dtype=np.float32)
            np.testing.assert_allclose(got, embeddings[image], rtol=1e-4, atol=1e-5)
        else:
            response = await http.post("/predict?top_k=1", content=data, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0][0]["index"] == int(top1[image])

    async def run() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            before = await http.get("/metrics")
            await asyncio.gather(*(one(http, index) for index in range(64)))
            after = await http.get("/metrics")
        batches = metric_value(after.text, "resnet_batch_size_count") - metric_value(
            before.text, "resnet_batch_size_count"
        )
        singles = metric_value(after.text, "resnet_batch_size_bucket", {"le": "1.0"}) - (
            metric_value(before.text, "resnet_batch_size_bucket", {"le": "1.0"})
        )
        images = metric_value(after.text, "resnet_batch_size_sum") - metric_value(
            before.text, "resnet_batch_size_sum"
        )
        assert images == 64
        assert batches < 64, "no batch larger than one image formed under concurrency"
        assert singles < batches

    asyncio.run(run())


def test_batched_result_equals_unbatched(
    client: httpx.Client, distinct_jpegs: list[bytes], reference: Reference
) -> None:
    images = distinct_jpegs[:8]
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    before = client.get("/metrics").text
    together = client.post("/embed?normalize=false", files=files)
    after = client.get("/metrics").text
    assert together.status_code == 200
    # One request's images reach the engine together: one batch of 8.
    assert (
        metric_value(after, "resnet_batch_size_count")
        - metric_value(before, "resnet_batch_size_count")
        == 1
    )
    assert (
        metric_value(after, "resnet_batch_size_sum") - metric_value(before, "resnet_batch_size_sum")
        == 8
    )
    alone = [
        client.post(
            "/embed?normalize=false", content=data, headers={"content-type": "image/jpeg"}
        ).json()["embeddings"][0]
        for data in images
    ]
    np.testing.assert_allclose(
        np.array(together.json()["embeddings"]), np.array(alone), rtol=1e-4, atol=1e-5
    )
    # And the graph itself: batch of 8 vs 8 batches of 1.
    pixels = np.stack([reference.preprocess(data) for data in images])
    batched = reference.session.run(["embedding"], {"images": pixels})[0]
    single = np.concatenate(
        [reference.session.run(["embedding"], {"images": pixels[i : i + 1]})[0] for i in range(8)]
    )
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_health_info_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["state"] == "ready"
    assert info["model"]["arch"] == "resnet18"
    assert info["model"]["trained"] is False
    assert "UNTRAINED" in info["model"]["warning"]
    assert info["model"]["source"] == {"kind": "random-init", "seed": 0}
    assert info["serving"]["precision"] == "fp32"
    assert info["serving"]["runtime"] == "onnxruntime"
    assert info["serving"]["runtime_version"] == ort.__version__
    # What the fixture asked for (the CPU, for its 1e-4 comparisons), and got it all.
    assert info["serving"]["providers_requested"] == ["CPUExecutionProvider"]
    assert info["serving"]["execution_providers"] == info["serving"]["providers_requested"]
    assert info["serving"]["gpu_fallback"] is False
    assert info["serving"]["verified"] is True
    assert info["batching"]["max_batch_size"] == 8
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric_value(metrics.text, "resnet_ready") == 1
    model = {
        "trained": "false",
        "gpu_fallback": "false",
        "device": info["serving"]["device"],
        "runtime": "onnxruntime",
    }
    assert metric_value(metrics.text, "resnet_model_info", model) == 1


def test_requests_and_images_are_counted(
    client: httpx.Client, photo_jpegs: dict[str, bytes]
) -> None:
    data = next(iter(photo_jpegs.values()))
    labels = {"endpoint": "predict", "status": "200"}
    before = client.get("/metrics").text
    client.post("/predict", files=[("files", ("a.jpg", data, "image/jpeg"))] * 2)
    client.post("/predict", content=b"not an image", headers={"content-type": "image/png"})
    after = client.get("/metrics").text
    assert (
        metric_value(after, "resnet_requests_total", labels)
        - metric_value(before, "resnet_requests_total", labels)
        == 1
    )
    assert (
        metric_value(after, "resnet_images_total", {"endpoint": "predict"})
        - metric_value(before, "resnet_images_total", {"endpoint": "predict"})
        == 2
    )
    bad = {"reason": "bad_input"}
    assert (
        metric_value(after, "resnet_rejections_total", bad)
        - metric_value(before, "resnet_rejections_total", bad)
        == 1
    )


def test_openapi_documents_inputs_and_its_example_works(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "multipart/form-data", "application/json"} <= set(body)
    example = body["application/json"]["example"]
    response = client.post("/predict", json=example)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]) == 3
    embed_example = spec["paths"]["/embed"]["post"]["requestBody"]["content"]["application/json"]
    assert client.post("/embed", json=embed_example["example"]).status_code == 200


def test_int8_variant_is_served_when_asked(
    resnet18_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    settings = Settings(model_dir=resnet18_package, precision="int8", max_batch_size=4)
    app = create_app(settings)
    data = next(iter(photo_jpegs.values()))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/info").json()
        assert info["serving"]["precision"] == "int8"
        assert info["serving"]["file"] == "model.int8.onnx"
        response = http.post(
            "/embed?normalize=false", content=data, headers={"content-type": "image/jpeg"}
        )
        assert response.json()["model"]["precision"] == "int8"
    pixels = ImagePreprocessor(ModelPackage.load(resnet18_package).manifest.preprocessing, 10**8)(
        data
    )
    session = ort.InferenceSession(  # where the server ran it: CPU, or CUDA on a GPU host
        str(resnet18_package / "model.int8.onnx"), providers=info["serving"]["execution_providers"]
    )
    expected = session.run(["embedding"], {"images": pixels[None]})[0][0]
    np.testing.assert_allclose(response.json()["embeddings"][0], expected, rtol=1e-4, atol=1e-5)


def test_missing_variant_falls_back_to_fp32_with_a_warning(
    resnet18_package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(model_dir=resnet18_package, precision="fp16")
    app = create_app(settings)
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        info = http.get("/info").json()
    assert info["serving"]["precision"] == "fp32"
    assert info["serving"]["requested_precision"] == "fp16"
    assert any("fp16" in warning for warning in info["serving"]["warnings"])
