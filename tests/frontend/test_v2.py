"""The Open Inference Protocol (KServe v2), spoken by Triton's own clients, unmodified:
`tritonclient.http` on /v2 and `tritonclient.grpc` on --grpc-port, against one live
server on the real (random-weight) ResNet-18 package. Results must equal /predict's and
/embed's for the same images."""

from __future__ import annotations

import base64
import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from loadtests.server import free_port
from service.config import Settings
from service.frontend.app import create_app
from service.frontend.v2.proto import grpc_predict_v2_pb2 as pb
from service.frontend.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from tests.frontend.hostile import LIMITS, PREDICT, V2, HostileCase, image_cases
from tests.support import metric_value, running_server

ENCODED = "image_bytes"
HEADER = "Inference-Header-Content-Length"
PIXELS = "images"


class Served:
    def __init__(self, url: str, grpc_port: int, package: ModelPackage) -> None:
        self.url = url
        self.http = httpclient.InferenceServerClient(url.removeprefix("http://"))
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.grpc = grpcclient.InferenceServerClient(self.grpc_address)
        self.name = package.manifest.name
        self.version = package.manifest.version
        self.package = package


@pytest.fixture(scope="module")
def served(resnet18_package: Path) -> Iterator[Served]:
    settings = Settings(model_dir=resnet18_package, grpc_port=free_port(), max_batch_size=4)
    app = create_app(settings)
    with running_server(app) as url:
        served = Served(url, app.state.grpc_port, ModelPackage.load(resnet18_package))
        yield served
        served.http.close()
        served.grpc.close()
        del served
        # tritonclient.http's client holds gevent objects bound to this thread; collected
        # later on another thread (a server's), its __del__ raises. Collect it here.
        gc.collect()


@pytest.fixture(scope="module")
def jpegs(photo_jpegs: dict[str, bytes]) -> list[bytes]:
    return list(photo_jpegs.values())[:3]


@pytest.fixture(scope="module")
def reference(served: Served, jpegs: list[bytes]) -> dict[str, Any]:
    """/predict's top 5 indices and /embed's vectors for the same images."""
    with httpx.Client(base_url=served.url, timeout=60) as http:
        files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpegs)]
        predicted = http.post("/predict", files=files, params={"top_k": 5})
        embedded = http.post("/embed", files=files)
    assert predicted.status_code == 200, predicted.text
    assert embedded.status_code == 200, embedded.text
    return {
        "top5": [[p["index"] for p in image] for image in predicted.json()["predictions"]],
        "labels": [[p["label"] for p in image] for image in predicted.json()["predictions"]],
        "embeddings": np.array(embedded.json()["embeddings"]),
    }


def pixels_of(package: ModelPackage, jpegs: list[bytes]) -> np.ndarray:
    """The images preprocessed as the service would: UINT8 [N, 224, 224, 3]."""
    preprocess = ImagePreprocessor(package.manifest.preprocessing, 50_000_000)
    return np.stack([preprocess(data) for data in jpegs])


def assert_matches(reference: dict[str, Any], logits: np.ndarray, embedding: np.ndarray) -> None:
    top5 = [list(np.lexsort((np.arange(row.size), -row))[:5]) for row in logits]
    assert top5 == reference["top5"]
    expected = reference["embeddings"]
    cosine = np.sum(embedding * expected, axis=1) / (
        np.linalg.norm(embedding, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert embedding.shape == expected.shape
    assert np.all(cosine >= 0.999), cosine


def encoded_input(module: Any, jpegs: list[bytes], binary: bool) -> Any:
    tensor = module.InferInput(ENCODED, [len(jpegs)], "BYTES")
    if binary:
        data = np.array(jpegs, dtype=np.object_)
    else:  # JSON strings must be UTF-8: images go base64 encoded
        data = np.array([base64.b64encode(image) for image in jpegs], dtype=np.object_)
    if module is grpcclient:
        tensor.set_data_from_numpy(data)
    else:
        tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def pixel_input(module: Any, pixels: np.ndarray, binary: bool) -> Any:
    tensor = module.InferInput(PIXELS, list(pixels.shape), "UINT8")
    if module is grpcclient:
        tensor.set_data_from_numpy(pixels)
    else:
        tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


# ------------------------------------------------------------------ health and metadata


def test_health_and_metadata_over_http_and_grpc(served: Served) -> None:
    for client in (served.http, served.grpc):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(served.name)
        assert client.is_model_ready(served.name, served.version)
    server = served.http.get_server_metadata()
    assert server["name"] == "resnet-serve"
    assert set(server["extensions"]) >= {"binary_tensor_data", "classification"}
    assert served.grpc.get_server_metadata(as_json=True)["extensions"] == server["extensions"]
    crop = served.package.manifest.preprocessing.crop
    expected_inputs = [
        {"name": PIXELS, "datatype": "UINT8", "shape": [-1, crop, crop, 3]},
        {"name": ENCODED, "datatype": "BYTES", "shape": [-1]},
    ]
    manifest = served.package.manifest
    expected_outputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, manifest.num_classes]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, manifest.embedding_dim]},
    ]
    http_meta = served.http.get_model_metadata(served.name, served.version)
    assert http_meta["platform"] == "onnxruntime_onnx"
    assert http_meta["versions"] == [served.version]
    assert http_meta["inputs"] == expected_inputs
    assert http_meta["outputs"] == expected_outputs
    grpc_meta = served.grpc.get_model_metadata(served.name, as_json=True)
    assert grpc_meta["platform"] == "onnxruntime_onnx"
    # protobuf's JSON writes int64 as strings
    assert [
        {**entry, "shape": [int(dim) for dim in entry["shape"]]} for entry in grpc_meta["inputs"]
    ] == expected_inputs


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_encoded_images_equal_predict_and_embed(
    served: Served, jpegs: list[bytes], reference: dict[str, Any], binary: bool
) -> None:
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=binary),
        httpclient.InferRequestedOutput("embedding", binary_data=binary),
    ]
    result = served.http.infer(
        served.name, [encoded_input(httpclient, jpegs, binary)], outputs=outputs
    )
    assert_matches(reference, result.as_numpy("logits"), result.as_numpy("embedding"))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_preprocessed_pixels_equal_predict_and_embed(
    served: Served, jpegs: list[bytes], reference: dict[str, Any], binary: bool
) -> None:
    pixels = pixels_of(served.package, jpegs)
    result = served.http.infer(
        served.name,
        [pixel_input(httpclient, pixels, binary)],
        model_version=served.version,
        outputs=[
            httpclient.InferRequestedOutput(name, binary_data=binary)
            for name in ("logits", "embedding")
        ],
    )
    assert_matches(reference, result.as_numpy("logits"), result.as_numpy("embedding"))


def test_grpc_encoded_images_and_pixels_equal_predict_and_embed(
    served: Served, jpegs: list[bytes], reference: dict[str, Any]
) -> None:
    for tensor in (
        encoded_input(grpcclient, jpegs, True),
        pixel_input(grpcclient, pixels_of(served.package, jpegs), True),
    ):
        result = served.grpc.infer(served.name, [tensor], client_timeout=60)
        assert_matches(reference, result.as_numpy("logits"), result.as_numpy("embedding"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_extension_gives_the_top_k_of_predict(
    served: Served, jpegs: list[bytes], reference: dict[str, Any], protocol: str
) -> None:
    module: Any = httpclient if protocol == "http" else grpcclient
    client = served.http if protocol == "http" else served.grpc
    result = client.infer(
        served.name,
        [encoded_input(module, jpegs, True)],
        outputs=[module.InferRequestedOutput("logits", class_count=3)],
    )
    classes = result.as_numpy("logits")
    assert classes.shape == (len(jpegs), 3)
    for row, top5, labels in zip(classes, reference["top5"], reference["labels"], strict=True):
        parsed = [entry.decode().split(":", 2) for entry in row]
        assert [int(index) for _, index, _ in parsed] == top5[:3]
        assert [label for _, _, label in parsed] == labels[:3]
        scores = [float(score) for score, _, _ in parsed]
        assert scores == sorted(scores, reverse=True)
    assert result.as_numpy("embedding") is None  # only the requested output comes back


def test_requests_are_counted_per_protocol(served: Served, jpegs: list[bytes]) -> None:
    served.grpc.infer(served.name, [encoded_input(grpcclient, jpegs[:1], True)])
    served.http.infer(served.name, [encoded_input(httpclient, jpegs[:1], True)])
    metrics = httpx.get(served.url + "/metrics").text
    for endpoint in ("v2_http", "v2_grpc"):
        assert (
            metric_value(metrics, "resnet_requests_total", {"endpoint": endpoint, "status": "200"})
            >= 1
        )
        assert metric_value(metrics, "resnet_images_total", {"endpoint": endpoint}) >= 1


# ------------------------------------------------------------------ errors


def http_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value


def test_http_errors_have_triton_status_codes_and_name_the_tensor(
    served: Served, jpegs: list[bytes]
) -> None:
    unknown = http_error(lambda: served.http.get_model_metadata("no-such-model"))
    assert unknown.status() == "404"
    assert "no-such-model" in unknown.message()
    version = http_error(
        lambda: served.http.infer(
            served.name, [encoded_input(httpclient, jpegs[:1], True)], model_version="999"
        )
    )
    assert version.status() == "404"
    wrong_type = httpclient.InferInput(PIXELS, [1, 224, 224, 3], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((1, 224, 224, 3), np.float32))
    error = http_error(lambda: served.http.infer(served.name, [wrong_type]))
    assert error.status() == "400"
    assert f"'{PIXELS}'" in error.message()
    assert "UINT8" in error.message()
    wrong_shape = httpclient.InferInput(PIXELS, [1, 100, 100, 3], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 100, 100, 3), np.uint8))
    error = http_error(lambda: served.http.infer(served.name, [wrong_shape]))
    assert error.status() == "400"
    assert f"'{PIXELS}'" in error.message()
    assert "shape" in error.message()
    wrong_name = httpclient.InferInput("INPUT0", [1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([jpegs[0]], dtype=np.object_))
    error = http_error(lambda: served.http.infer(served.name, [wrong_name]))
    assert error.status() == "400"
    assert "'INPUT0'" in error.message()
    not_an_image = encoded_input(httpclient, [b"not an image"], True)
    assert http_error(lambda: served.http.infer(served.name, [not_an_image])).status() == "400"
    bad_output = [httpclient.InferRequestedOutput("probabilities")]
    error = http_error(
        lambda: served.http.infer(
            served.name, [encoded_input(httpclient, jpegs[:1], True)], outputs=bad_output
        )
    )
    assert error.status() == "400"
    assert "'probabilities'" in error.message()


def one_input(**tensor: object) -> bytes:
    return orjson.dumps({"inputs": [tensor]})


BYTES_1 = {"name": ENCODED, "datatype": "BYTES", "shape": [1]}
PAST_THE_END = one_input(**BYTES_1, parameters={"binary_data_size": 10})  # no binary part


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b'{"inputs": []}', {}, "inputs"),
        (one_input(**BYTES_1, data=["%%%"]), {}, "base64"),
        (one_input(**{**BYTES_1, "shape": [2]}, data=["AA=="]), {}, f"'{ENCODED}'"),
        (one_input(name=PIXELS, datatype="UINT8", shape=[1, 224, 224, 3], data=[300]), {}, PIXELS),
        (PAST_THE_END, {HEADER: str(len(PAST_THE_END))}, "binary_data_size"),
        (b"{}", {HEADER: "99"}, HEADER),
        (one_input(name="x", datatype="COMPLEX", shape=[1], data=[1]), {}, "'x'"),
    ],
    ids=["json", "no-inputs", "base64", "count", "range", "past-end", "header-length", "datatype"],
)
def test_malformed_requests_get_400_in_the_protocols_error_shape(
    served: Served, body: bytes, headers: dict[str, str], fragment: str
) -> None:
    response = httpx.post(
        f"{served.url}/v2/models/{served.name}/infer", content=body, headers=headers
    )
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert isinstance(response.json()["error"], str)
    assert fragment in response.json()["error"]


def test_unknown_v2_routes_answer_in_the_protocols_error_shape(served: Served) -> None:
    response = httpx.get(f"{served.url}/v2/nothing/here")
    assert response.status_code == 404
    assert isinstance(response.json()["error"], str)
    response = httpx.get(f"{served.url}/v2/models/other/ready")
    assert response.status_code == 404
    assert "other" in response.json()["error"]


def test_grpc_errors_have_grpc_status_codes(served: Served, jpegs: list[bytes]) -> None:
    def grpc_error(call: Any) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as raised:
            call()
        return raised.value

    assert (
        grpc_error(lambda: served.grpc.get_model_metadata("nope")).status()
        == "StatusCode.NOT_FOUND"
    )
    wrong_shape = grpcclient.InferInput(PIXELS, [1, 10, 10, 3], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 10, 10, 3), np.uint8))
    error = grpc_error(lambda: served.grpc.infer(served.name, [wrong_shape]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"'{PIXELS}'" in error.message()
    too_many = encoded_input(grpcclient, jpegs[:1] * 40, True)  # over max_images_per_request
    assert (
        grpc_error(lambda: served.grpc.infer(served.name, [too_many])).status()
        == "StatusCode.INVALID_ARGUMENT"
    )


# ------------------------------------------------------------------ hostile images


@pytest.fixture(scope="module")
def limited(resnet18_package: Path) -> Iterator[str]:
    """A server with the hostile corpus's small limits."""
    settings = Settings(
        model_dir=resnet18_package, max_batch_size=4, warmup_batch_sizes=[1], **LIMITS
    )
    with running_server(create_app(settings)) as url:
        yield url


@pytest.mark.parametrize("case", image_cases(), ids=lambda case: case.name)
def test_hostile_images_get_the_same_status_over_v2(
    limited: str, resnet18_package: Path, case: HostileCase
) -> None:
    """Each image case of tests/frontend/hostile.py, as a v2 BYTES tensor (binary extension): the
    status /predict gives it, in the protocol's error shape; valid odd images classify."""
    name = ModelPackage.load(resnet18_package).manifest.name
    request = case.build(V2, PREDICT)
    response = httpx.post(
        f"{limited}/v2/models/{name}/infer",
        content=request.content,
        headers=request.headers,
        timeout=60,
    )
    assert response.status_code == case.status, response.text[:300]
    if case.status == 200:
        (output,) = response.json()["outputs"]
        assert output["shape"] == [1, 1]
        assert output["data"][0].count(":") >= 2
    else:
        assert set(response.json()) == {"error"}
        assert len(response.json()["error"]) < 300


def test_no_hostile_image_made_a_server_error(limited: str) -> None:
    metrics = httpx.get(f"{limited}/metrics").text
    for status in ("500", "503", "504"):
        count = metric_value(
            metrics, "resnet_requests_total", {"endpoint": "v2_http", "status": status}
        )
        assert count == 0, status
    assert metric_value(metrics, "resnet_rejections_total", {"reason": "internal"}) == 0


def test_grpc_typed_contents_are_read_like_raw_contents(
    served: Served, jpegs: list[bytes], reference: dict[str, Any]
) -> None:
    """Tensors in `contents` (bytes_contents, uint_contents) rather than
    `raw_input_contents`, as other clients send them: same results."""
    pixels = pixels_of(served.package, jpegs)
    encoded = pb.ModelInferRequest(model_name=served.name)
    encoded.inputs.add(name=ENCODED, datatype="BYTES", shape=[len(jpegs)])
    encoded.inputs[0].contents.bytes_contents.extend(jpegs)
    typed = pb.ModelInferRequest(model_name=served.name)
    typed.inputs.add(name=PIXELS, datatype="UINT8", shape=list(pixels.shape))
    typed.inputs[0].contents.uint_contents.extend(pixels.reshape(-1).tolist())
    with grpc.insecure_channel(served.grpc_address) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for request in (encoded, typed):
            response = infer(request, timeout=60)
            outputs = {
                output.name: np.frombuffer(raw, "<f4").reshape(list(output.shape))
                for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
            }
            assert_matches(reference, outputs["logits"], outputs["embedding"])
        typed.inputs[0].contents.uint_contents[0] = 256
        with pytest.raises(grpc.RpcError) as raised:
            infer(typed, timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{PIXELS}'" in raised.value.details()


def test_the_service_needs_no_grpc_unless_it_serves_grpc(resnet18_package: Path) -> None:
    """Without --grpc-port, neither grpcio nor the generated stubs are imported: a host
    without grpcio (or with one older than the stubs ask for) still serves HTTP."""
    script = (
        "import sys; sys.modules['grpc'] = None\n"  # any `import grpc` now fails
        "from fastapi.testclient import TestClient\n"
        "from service.frontend.app import create_app\n"
        "from service.config import Settings\n"
        f"app = create_app(Settings(model_dir={str(resnet18_package)!r}))\n"
        "with TestClient(app) as client:\n"
        "    assert client.get('/healthz').status_code == 200\n"
        "assert 'service.frontend.v2.grpc_api' not in sys.modules\n"
        "print('served without grpc')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served without grpc" in done.stdout
