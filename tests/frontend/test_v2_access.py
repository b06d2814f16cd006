"""The Open Inference Protocol's refusals, with Triton's clients: API keys on /v2 and on
gRPC (probes open unless asked), draining (503 / UNAVAILABLE), and the client's gRPC
deadline as the request's. A fake engine stands in for the model: these are about access
and lifecycle, not results."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from loadtests.server import free_port
from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from tests.support import FakeEngine, metric_value, png, running_server

KEY = "v2-test-key"
PNG = {"content-type": "image/png"}


def image_input(module: type) -> object:
    tensor = module.InferInput("image_bytes", [1], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([png()], dtype=np.object_))
    return tensor


@pytest.fixture
def engine(resnet18_package: Path) -> FakeEngine:
    return FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)


@pytest.fixture
def name(resnet18_package: Path) -> str:
    return ModelPackage.load(resnet18_package).manifest.name


@pytest.fixture
def server(
    resnet18_package: Path, engine: FakeEngine, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str, object]]:
    """(HTTP url, gRPC address, app), with the settings the test's `settings` marker gives."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    app = create_app(
        Settings(model_dir=resnet18_package, grpc_port=free_port(), **overrides),
        engine_factory=engine.factory,
    )
    with running_server(app) as url:
        yield url, f"127.0.0.1:{app.state.grpc_port}", app


Clients = tuple[httpclient.InferenceServerClient, grpcclient.InferenceServerClient]


@pytest.fixture
def clients(server: tuple[str, str, object]) -> Iterator[Clients]:
    url, address, _ = server
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(address)
    yield http, grpc
    http.close()
    grpc.close()
    del http, grpc
    # tritonclient.http's client holds gevent objects bound to this thread; collected later
    # on another thread (the server's), its __del__ raises. Collect it here and now.
    gc.collect()


def refused(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()  # type: ignore[operator]
    return raised.value


@pytest.mark.settings(api_keys=KEY)
def test_api_keys_guard_v2_over_http_and_grpc_but_not_its_health_probes(
    server: tuple[str, str, object], name: str, clients: Clients
) -> None:
    url, _, _ = server
    http, grpc = clients
    assert http.is_server_ready()  # probes stay open
    assert grpc.is_server_ready()
    for key in (None, "wrong"):
        # fresh dicts: tritonclient.http adds its own headers to the one it is given
        def headers(key: str | None = key) -> dict[str, str]:
            return {"authorization": f"Bearer {key}"} if key else {}

        error = refused(lambda: http.infer(name, [image_input(httpclient)], headers=headers()))
        assert error.status() == "401"
        assert "API key" in error.message()
        error = refused(lambda: grpc.infer(name, [image_input(grpcclient)], headers=headers()))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
    response = httpx.get(f"{url}/v2/models/{name}")
    assert response.status_code == 401
    assert isinstance(response.json()["error"], str)  # the protocol's shape, not /predict's
    assert refused(lambda: grpc.get_model_metadata(name)).status() == "StatusCode.UNAUTHENTICATED"
    assert (
        http.infer(
            name, [image_input(httpclient)], headers={"Authorization": f"Bearer {KEY}"}
        ).as_numpy("logits")
        is not None
    )
    result = grpc.infer(name, [image_input(grpcclient)], headers={"authorization": f"Bearer {KEY}"})
    assert result.as_numpy("logits") is not None
    assert grpc.get_model_metadata(name, headers={"authorization": f"Bearer {KEY}"}).name == name


def test_draining_refuses_new_v2_work_over_http_and_grpc(
    server: tuple[str, str, object], name: str, clients: Clients
) -> None:
    url, _, app = server
    http, grpc = clients
    assert grpc.infer(name, [image_input(grpcclient)]).as_numpy("logits") is not None
    app.state.runtime.begin_drain()  # type: ignore[attr-defined]  # what SIGTERM does first
    assert not http.is_server_ready()
    assert not grpc.is_server_ready()
    assert refused(lambda: http.infer(name, [image_input(httpclient)])).status() == "503"
    response = httpx.get(f"{url}/v2/health/ready")
    assert response.status_code == 503
    assert "shutting down" in response.json()["error"]
    error = refused(lambda: grpc.infer(name, [image_input(grpcclient)]))
    assert error.status() == "StatusCode.UNAVAILABLE"


def test_the_grpc_deadline_becomes_the_requests_deadline(
    server: tuple[str, str, object], name: str, engine: FakeEngine, clients: Clients
) -> None:
    """The engine is held: the call can only end by its deadline (0.5 s, far below the
    server's own 30 s), and the server must count it as timed out or abandoned."""
    url, _, _ = server
    engine.gate = threading.Event()
    _, grpc = clients
    try:
        error = refused(lambda: grpc.infer(name, [image_input(grpcclient)], client_timeout=0.5))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        engine.gate.set()
    deadline = time.monotonic() + 10
    while True:  # the server's side of the call may end a moment after the client's
        metrics = httpx.get(f"{url}/metrics").text
        ended = sum(
            metric_value(metrics, "resnet_requests_total", {"endpoint": "v2_grpc", "status": code})
            for code in ("504", "499")
        )
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ended == 1
    assert (
        metric_value(metrics, "resnet_requests_total", {"endpoint": "v2_grpc", "status": "200"})
        == 0
    )


@pytest.mark.settings(max_batch_size=1, max_queue_size=1, max_concurrent_batches=1)
def test_a_full_queue_is_429_over_http_and_resource_exhausted_over_grpc(
    server: tuple[str, str, object], name: str, engine: FakeEngine, clients: Clients
) -> None:
    """One image held on the engine, one waiting: the queue (of 1) is full, so both
    protocols refuse at once; the held work completes once the engine is released."""
    url, _, app = server
    engine.gate = threading.Event()
    batcher = app.state.runtime.batcher  # type: ignore[attr-defined]
    answers: list[int] = []

    def predict() -> None:
        answers.append(
            httpx.post(f"{url}/predict", content=png(), headers=PNG, timeout=30).status_code
        )

    senders = [threading.Thread(target=predict) for _ in range(2)]
    http, grpc = clients
    try:
        senders[0].start()
        assert engine.running.wait(10)
        senders[1].start()
        deadline = time.monotonic() + 10
        while batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.depth == 1
        error = refused(lambda: http.infer(name, [image_input(httpclient)]))
        assert error.status() == "429"
        assert "queue" in error.message()
        error = refused(lambda: grpc.infer(name, [image_input(grpcclient)]))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        engine.gate.set()
        for sender in senders:
            sender.join(30)
    assert answers == [200, 200]


def test_grpc_messages_beyond_grpcs_4_mb_default_are_served(
    server: tuple[str, str, object], name: str, clients: Clients
) -> None:
    """Message limits follow --max-body-bytes (64 MiB), not gRPC's 4 MB default."""
    _, grpc = clients
    large = png((1300, 1300), noise=True)  # random pixels: about 5 MB as PNG
    assert len(large) > 4 * 1024 * 1024
    tensor = grpcclient.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([large], dtype=np.object_))
    assert grpc.infer(name, [tensor]).as_numpy("logits").shape[0] == 1
