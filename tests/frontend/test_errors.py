"""Every failure a client can cause or meet, through a real HTTP server: its status, its
JSON body, and that the server keeps serving everyone else afterwards.

A controllable engine double stands in for ONNX Runtime where a test must hold the engine
busy (queue full, deadlines, disconnects, failing batches); the package is a real one.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from tests.support import FakeEngine, metric_value, png, png_claiming, running_server

JPEG = {"content-type": "image/jpeg"}
PNG = {"content-type": "image/png"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert "Traceback" not in response.text


@pytest.fixture
def fake_engine(resnet18_package: Path) -> FakeEngine:
    return FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)


def serve(package: Path, engine: FakeEngine, **overrides: object) -> tuple[Settings, object]:
    settings = Settings(model_dir=package, **overrides)
    return settings, create_app(settings, engine_factory=engine.factory)


@pytest.fixture
def limited(resnet18_package: Path, fake_engine: FakeEngine) -> Iterator[httpx.Client]:
    _, app = serve(
        resnet18_package,
        fake_engine,
        max_body_bytes=300_000,
        max_images_per_request=3,
        max_image_pixels=1_000_000,
    )
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


BAD_REQUESTS: list[tuple[str, Callable[[], dict], int, str]] = [
    ("undecodable bytes", lambda: {"content": b"\x00garbage" * 10, "headers": JPEG}, 400, "invalid_image"),
    ("empty body", lambda: {"content": b"", "headers": PNG}, 400, "invalid_image"),
    ("truncated png", lambda: {"content": png((300, 300))[:200], "headers": PNG}, 400, "invalid_image"),
    ("text as image", lambda: {"content": b"hello world", "headers": JPEG}, 400, "invalid_image"),
    ("svg", lambda: {"content": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "headers": {"content-type": "image/svg+xml"}}, 415, "unsupported_media_type"),
    ("no content type", lambda: {"content": png()}, 415, "unsupported_media_type"),
    ("text/plain", lambda: {"content": png(), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("body too large", lambda: {"content": b"\xff" * 400_000, "headers": JPEG}, 413, "payload_too_large"),
    ("too many images", lambda: {"files": [("files", ("a.png", png(), "image/png"))] * 4}, 413, "too_many_images"),
    ("too many pixels", lambda: {"content": png((1100, 1000)), "headers": PNG}, 413, "image_too_large"),
    ("decompression bomb", lambda: {"content": png_claiming(100_000, 100_000), "headers": PNG}, 413, "image_too_large"),
    ("bad base64", lambda: {"json": {"images": ["@@@"]}}, 400, "invalid_image"),
    ("base64 of garbage", lambda: {"json": {"images": [base64.b64encode(b"nope").decode()]}}, 400, "invalid_image"),
    ("malformed json", lambda: {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ("json not an object", lambda: {"json": [1, 2]}, 422, "invalid_parameter"),
    ("json without images", lambda: {"json": {"top_k": 3}}, 422, "invalid_parameter"),
    ("images not strings", lambda: {"json": {"images": [1]}}, 422, "invalid_parameter"),
    ("no images", lambda: {"json": {"images": []}}, 422, "invalid_parameter"),
    ("unknown field", lambda: {"json": {"images": [base64.b64encode(png()).decode()], "topk": 1}}, 422, "invalid_parameter"),
    ("top_k zero", lambda: {"json": {"images": [base64.b64encode(png()).decode()], "top_k": 0}}, 422, "invalid_parameter"),
    ("top_k too big", lambda: {"json": {"images": [base64.b64encode(png()).decode()], "top_k": 100_000}}, 422, "invalid_parameter"),
    ("top_k not int", lambda: {"json": {"images": [base64.b64encode(png()).decode()], "top_k": "many"}}, 422, "invalid_parameter"),
    ("multipart wrong field", lambda: {"files": [("image", ("a.png", png(), "image/png"))]}, 422, "invalid_parameter"),
    ("multipart no boundary", lambda: {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [pytest.param(args, status, code, id=name) for name, args, status, code in BAD_REQUESTS],
)
def test_bad_request_gets_a_clear_error_and_the_server_carries_on(
    limited: httpx.Client, request_args: Callable[[], dict], status: int, code: str
) -> None:
    assert_error(limited.post("/predict", **request_args()), status, code)
    ok = limited.post("/predict?top_k=2", content=png(), headers=PNG)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["predictions"][0]) == 2


@pytest.mark.parametrize(
    ("query", "code"),
    [("normalize=maybe", "invalid_parameter"), ("encoding=xml", "invalid_parameter")],
)
def test_bad_embed_parameters(limited: httpx.Client, query: str, code: str) -> None:
    assert_error(limited.post(f"/embed?{query}", content=png(), headers=PNG), 422, code)


def test_unknown_route_and_method(limited: httpx.Client) -> None:
    assert_error(limited.get("/nowhere"), 404, "not_found")
    assert_error(limited.get("/predict"), 405, "method_not_allowed")


async def wait_for_metric(
    http: httpx.AsyncClient, name: str, labels: dict[str, str] | None, value: float
) -> None:
    """Until /metrics shows `value` (bounded: 10 s)."""
    for _ in range(1000):
        if metric_value((await http.get("/metrics")).text, name, labels) >= value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name}{labels or ''} never reached {value}")


def gated(engine: FakeEngine) -> threading.Event:
    engine.gate = threading.Event()
    return engine.gate


def test_queue_full_answers_429_at_once(resnet18_package: Path, fake_engine: FakeEngine) -> None:
    gate = gated(fake_engine)
    _, app = serve(
        resnet18_package, fake_engine, max_queue_size=2, max_batch_size=1, max_concurrent_batches=1
    )

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            running = asyncio.ensure_future(http.post("/predict", content=png(), headers=PNG))
            assert await asyncio.to_thread(fake_engine.running.wait, 10)
            queued = [
                asyncio.ensure_future(
                    http.post("/predict", content=png(color=(i, 0, 0)), headers=PNG)
                )
                for i in range(2)
            ]
            await wait_for_metric(http, "resnet_queue_depth", None, 2)
            refused = await http.post("/predict", content=png(), headers=PNG)
            assert_error(refused, 429, "queue_full")
            assert refused.headers["retry-after"] == "1"
            gate.set()
            for response in [await running, *(await asyncio.gather(*queued))]:
                assert response.status_code == 200, response.text
            metrics = (await http.get("/metrics")).text
            assert metric_value(metrics, "resnet_rejections_total", {"reason": "queue_full"}) == 1

    with running_server(app) as url:
        asyncio.run(scenario(url))


def test_deadline_gives_504_and_queued_work_is_skipped(
    resnet18_package: Path, fake_engine: FakeEngine
) -> None:
    gate = gated(fake_engine)
    _, app = serve(
        resnet18_package,
        fake_engine,
        request_timeout_ms=300,
        max_batch_size=1,
        max_concurrent_batches=1,
    )

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.ensure_future(http.post("/predict", content=png(), headers=PNG))
            assert await asyncio.to_thread(fake_engine.running.wait, 10)
            second = await http.post("/predict", content=png(color=(1, 2, 3)), headers=PNG)
            assert_error(second, 504, "deadline_exceeded")
            assert_error(await first, 504, "deadline_exceeded")
            gate.set()
            ok = await http.post("/predict", content=png(color=(9, 9, 9)), headers=PNG)
            assert ok.status_code == 200
            metrics = (await http.get("/metrics")).text
            assert metric_value(metrics, "resnet_rejections_total", {"reason": "deadline"}) == 2
            assert (
                metric_value(metrics, "resnet_skipped_images_total", {"reason": "abandoned"}) == 1
            )
        # The engine ran the first image and the last, never the one that timed out queued.
        means = [float(batch.mean()) for batch in fake_engine.batches]
        assert len(means) == 2
        assert all(abs(mean - np.mean([1, 2, 3])) > 1 for mean in means)

    with running_server(app) as url:
        asyncio.run(scenario(url))


def test_disconnected_client_is_skipped_before_the_engine(
    resnet18_package: Path, fake_engine: FakeEngine
) -> None:
    gate = gated(fake_engine)
    # One batch at a time, so the second image waits in the queue while the first runs.
    _, app = serve(resnet18_package, fake_engine, max_batch_size=4, max_concurrent_batches=1)
    abandoned = png(color=(77, 77, 77))

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.ensure_future(http.post("/predict", content=png(), headers=PNG))
            assert await asyncio.to_thread(fake_engine.running.wait, 10)
            host, port = url.removeprefix("http://").split(":")
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(abandoned)}\r\n\r\n".encode()
                + abandoned
            )
            await writer.drain()
            await wait_for_metric(http, "resnet_queue_depth", None, 1)
            writer.close()  # the client gives up while its image waits in the queue
            await wait_for_metric(
                http, "resnet_rejections_total", {"reason": "client_disconnected"}, 1
            )
            gate.set()
            assert (await first).status_code == 200
            ok = await http.post("/predict", content=png(color=(5, 5, 5)), headers=PNG)
            assert ok.status_code == 200
            metrics = (await http.get("/metrics")).text
            assert (
                metric_value(metrics, "resnet_skipped_images_total", {"reason": "abandoned"}) == 1
            )
        assert all(abs(float(batch.mean()) - 77) > 1 for batch in fake_engine.batches)
        assert fake_engine.images_seen == 2

    with running_server(app) as url:
        asyncio.run(scenario(url))


def test_failing_batch_fails_only_its_requests(
    resnet18_package: Path, fake_engine: FakeEngine
) -> None:
    poison = (13, 13, 13)
    fake_engine.fail_when = lambda batch: bool(np.all(batch[0, 0, 0] == poison))
    _, app = serve(resnet18_package, fake_engine)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert_error(
            http.post("/predict", content=png(color=poison), headers=PNG), 500, "inference_failed"
        )
        ok = http.post("/predict", content=png(), headers=PNG)
        assert ok.status_code == 200
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "resnet_batches_total", {"outcome": "failed"}) == 1
        assert metric_value(metrics, "resnet_batches_total", {"outcome": "ok"}) >= 1


def test_not_ready_while_loading_then_ready(
    resnet18_package: Path, fake_engine: FakeEngine
) -> None:
    release = threading.Event()

    def slow_factory(settings: Settings, package: ModelPackage) -> tuple:
        release.wait(30)
        return fake_engine.factory(settings, package)

    settings = Settings(model_dir=resnet18_package)
    app = create_app(settings, engine_factory=slow_factory)
    with running_server(app, wait_loaded=False) as url, httpx.Client(base_url=url) as http:
        assert http.get("/healthz").status_code == 200
        assert_error(http.get("/readyz"), 503, "not_ready")
        assert_error(http.post("/predict", content=png(), headers=PNG), 503, "not_ready")
        assert http.get("/info").json()["state"] == "starting"
        release.set()
        for _ in range(1000):
            if http.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert http.get("/readyz").json() == {"status": "ready"}
        assert http.post("/predict", content=png(), headers=PNG).status_code == 200


def test_load_failure_is_reported_to_the_log_not_to_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients learn that loading failed; the path and the exception text go to the log."""
    missing = tmp_path / "missing"
    app = create_app(Settings(model_dir=missing))
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        health = http.get("/healthz")
        assert_error(health, 503, "not_ready")
        assert "failed to load" in health.json()["error"]["message"]
        assert_error(http.get("/readyz"), 503, "not_ready")
        assert_error(http.post("/predict", content=png(), headers=PNG), 503, "not_ready")
        info = http.get("/info")
        assert info.json()["state"] == "failed"
        for response in (health, http.get("/readyz"), info):
            assert str(tmp_path) not in response.text
            assert "PackageError" not in response.text
    assert any(
        "manifest.json is missing" in record.getMessage() and str(missing) in record.getMessage()
        for record in caplog.records
    )


def test_draining_refuses_new_work_with_503(
    resnet18_package: Path, fake_engine: FakeEngine
) -> None:
    _, app = serve(resnet18_package, fake_engine)
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        assert http.post("/predict", content=png(), headers=PNG).status_code == 200
        app.state.runtime.begin_drain()
        assert_error(http.get("/readyz"), 503, "draining")
        refused = http.post("/predict", content=png(), headers=PNG)
        assert_error(refused, 503, "draining")
        assert refused.headers["connection"] == "close"
        assert http.get("/healthz").status_code == 200


def test_an_image_that_fails_to_decode_in_a_batch_fails_alone(
    resnet18_package: Path, fake_engine: FakeEngine, photo_jpegs: dict[str, bytes]
) -> None:
    """A JPEG whose header is fine but whose data is cut off passes the check at the door,
    is decoded inside the batch, and fails only its own request (400), not its batch."""
    gate = gated(fake_engine)
    # One batch at a time, so the three wait together and form one batch (with two engine
    # instances, two of them would be a full batch beside the running one).
    _, app = serve(
        resnet18_package,
        fake_engine,
        max_batch_size=8,
        overlap_decode=False,
        max_concurrent_batches=1,
    )
    good = next(iter(photo_jpegs.values()))
    truncated = good[: len(good) // 3]

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.ensure_future(http.post("/predict", content=png(), headers=PNG))
            assert await asyncio.to_thread(fake_engine.running.wait, 10)
            queued = [
                asyncio.ensure_future(http.post("/predict", content=body, headers=JPEG))
                for body in (good, truncated, good)
            ]
            await wait_for_metric(http, "resnet_queue_depth", None, 3)
            gate.set()
            assert (await first).status_code == 200
            ok_1, bad, ok_2 = await asyncio.gather(*queued)
        assert ok_1.status_code == 200, ok_1.text
        assert ok_2.status_code == 200, ok_2.text
        assert_error(bad, 400, "invalid_image")
        # The two good images ran together; the bad one never reached the engine.
        assert [len(batch) for batch in fake_engine.batches] == [1, 2]

    with running_server(app) as url:
        asyncio.run(scenario(url))


def test_the_bad_image_of_a_multi_image_request_is_named(limited: httpx.Client) -> None:
    files = [
        ("files", ("a.png", png(), "image/png")),
        ("files", ("b.png", b"not an image at all", "image/png")),
    ]
    response = limited.post("/predict", files=files)
    assert_error(response, 400, "invalid_image")
    assert response.json()["error"]["message"].startswith("image 1: ")
