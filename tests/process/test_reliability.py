"""Reliability under faults and overload, through a real HTTP server: clients that vanish
mid-body or mid-queue, slow clients, memory budgets, overload, and the drain deadline.

An engine double (`FakeEngine`) holds the engine where a test needs it busy; the package,
the HTTP server, the batcher and the decoding are the real ones.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import uvicorn

from loadtests.client import open_loop, raw_request
from service.cli import DrainingServer
from service.config import Settings
from service.frontend.app import create_app
from service.frontend.http_protocol import with_header_timeout
from service.model_package import ModelPackage
from tests.support import FakeEngine, metric_value, png, running_server

PNG = {"content-type": "image/png"}
BOUND_S = 10.0  # upper bound on any wait; a passing test never gets near it


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket (bounded by the socket's timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (recv returns EOF)."""
    try:
        while chunk := sock.recv(65536):
            del chunk  # a response before the close is fine; wait for the EOF
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.fixture
def engine(resnet18_package: Path) -> FakeEngine:
    return FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)


@pytest.fixture
def make_server(
    resnet18_package: Path, engine: FakeEngine
) -> Iterator[Callable[..., tuple[str, object]]]:
    """Start a server over the real package and the engine double; settings as keywords."""
    stack: list[object] = []

    def start(**overrides: object) -> tuple[str, object]:
        options = overrides.pop("uvicorn_options", {})
        settings = Settings(model_dir=resnet18_package, **overrides)
        app = create_app(settings, engine_factory=engine.factory)
        server = running_server(app, **options)  # type: ignore[arg-type]
        url = server.__enter__()
        stack.append(server)
        return url, app

    yield start
    if engine.gate is not None:
        engine.gate.set()
    for server in reversed(stack):
        server.__exit__(None, None, None)  # type: ignore[attr-defined]


def metrics_of(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=BOUND_S).text


# ---------------------------------------------------------------- defects found by reading


def test_a_client_gone_while_sending_its_body_is_a_499_not_a_server_fault(
    make_server: Callable[..., tuple[str, object]], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = make_server()
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=BOUND_S) as sock:
        head = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.1)  # the handler is reading the body now
    reason = {"reason": "client_disconnected"}
    wait_until(
        lambda: metric_value(metrics_of(url), "resnet_rejections_total", reason) == 1,
        "the disconnect was counted",
    )
    metrics = metrics_of(url)
    assert metric_value(metrics, "resnet_rejections_total", {"reason": "internal"}) == 0
    assert metric_value(metrics, "resnet_requests_total", {"status": "499"}) == 1
    assert metric_value(metrics, "resnet_requests_total", {"status": "500"}) == 0
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@pytest.mark.parametrize(
    ("endpoint", "form", "field", "value"),
    [
        ("predict", "json", "top_k", 0),
        ("predict", "json", "top_k", "abc"),
        ("predict", "multipart", "top_k", "1000000000"),
        ("embed", "json", "encoding", "x" * 10_000),
        ("embed", "multipart", "normalize", "maybe"),
        ("embed", "json", "unknown", 1),
    ],
)
def test_bad_parameters_in_the_body_are_refused_before_any_inference(
    make_server: Callable[..., tuple[str, object]],
    engine: FakeEngine,
    endpoint: str,
    form: str,
    field: str,
    value: object,
) -> None:
    url, _ = make_server()
    image = png()
    with httpx.Client(base_url=url, timeout=BOUND_S) as http:
        if form == "json":
            body = {"images": [base64.b64encode(image).decode()], field: value}
            response = http.post(f"/{endpoint}", json=body)
        else:
            files = [("files", ("a.png", image, "image/png"))]
            response = http.post(f"/{endpoint}", files=files, data={field: str(value)})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert len(response.json()["error"]["message"]) < 200  # never the whole input echoed
    assert engine.batches == []  # no engine run was spent on it


def test_the_bad_image_of_a_request_is_named_when_it_fails_inside_a_batch(
    make_server: Callable[..., tuple[str, object]], engine: FakeEngine
) -> None:
    """On CPUs images are decoded inside the batch: a header that passes the door check
    but data that fails to decode must still say which image it was."""
    url, _ = make_server()
    good = png()
    truncated = png((64, 64), noise=True)[:-200]  # header intact, pixel data cut short
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate([good, truncated])]
    response = httpx.post(f"{url}/predict", files=files, timeout=BOUND_S)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_image"
    assert response.json()["error"]["message"].startswith("image 1: ")


# ---------------------------------------------------------------- memory budgets, slow clients


def test_bodies_beyond_the_shared_budget_are_refused_before_they_are_read(
    make_server: Callable[..., tuple[str, object]], engine: FakeEngine
) -> None:
    engine.gate = threading.Event()
    url, app = make_server(max_body_bytes=40_000, max_buffered_bytes=80_000)
    runtime = app.state.runtime  # type: ignore[attr-defined]
    image = png((100, 100), noise=True)
    assert 30_000 < len(image) < 40_000

    with (
        httpx.Client(base_url=url, timeout=BOUND_S * 3) as first,
        httpx.Client(base_url=url, timeout=BOUND_S * 3) as second,
    ):
        held = [
            threading.Thread(
                target=client.post, args=("/predict",), kwargs={"content": image, "headers": PNG}
            )
            for client in (first, second)
        ]
        for thread in held:
            thread.start()
        wait_until(lambda: runtime.in_progress == 2, "both requests are in progress")
        # 2 x ~30 KB held; another ~30 KB would pass 80 KB: refused without reading it.
        refused = httpx.post(f"{url}/predict", content=image, headers=PNG, timeout=BOUND_S)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_busy"
        assert refused.headers["retry-after"] == "1"
        # Without a Content-Length (chunked) the refusal comes as the bytes pass the budget.
        chunks = (image[i : i + 4096] for i in range(0, len(image), 4096))
        chunked = httpx.post(f"{url}/predict", content=chunks, headers=PNG, timeout=BOUND_S)
        assert chunked.status_code == 429, chunked.text
        engine.gate.set()
        for thread in held:
            thread.join(BOUND_S)
    assert httpx.post(f"{url}/predict", content=image, headers=PNG).status_code == 200
    reason = {"reason": "too_busy"}
    assert metric_value(metrics_of(url), "resnet_rejections_total", reason) == 2


def test_a_body_that_arrives_too_slowly_gets_408_and_the_connection_closes(
    make_server: Callable[..., tuple[str, object]],
) -> None:
    url, _ = make_server(body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=BOUND_S) as sock:
        head = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        sock.sendall(head + b"Content-Length: 5000\r\n\r\n" + png()[:20])
        status, headers, body = read_response(sock)
        assert status == 408
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
    reason = {"reason": "body_timeout"}
    assert metric_value(metrics_of(url), "resnet_rejections_total", reason) == 1


def test_slow_headers_are_cut_off_while_others_are_served(
    make_server: Callable[..., tuple[str, object]],
) -> None:
    url, _ = make_server(uvicorn_options={"http": with_header_timeout(0.5)})
    port = port_of(url)
    slow = [socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) for _ in range(20)]
    silent = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    try:
        for sock in slow:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")  # and never the end
        response = httpx.post(f"{url}/predict", content=png(), headers=PNG, timeout=BOUND_S)
        assert response.status_code == 200, response.text
        for sock in [*slow, silent]:
            assert closed_by_server(sock)
        # A connection that keeps its headers timely is not affected.
        with httpx.Client(base_url=url, timeout=BOUND_S) as http:
            for _ in range(3):
                assert http.get("/healthz").status_code == 200
                time.sleep(0.3)
    finally:
        for sock in [*slow, silent]:
            sock.close()


# ---------------------------------------------------------------- vanishing clients, overload


def test_a_thousand_clients_that_vanish_in_the_queue_are_skipped_without_leaks(
    make_server: Callable[..., tuple[str, object]], engine: FakeEngine
) -> None:
    engine.gate = threading.Event()
    url, app = make_server(max_batch_size=8, max_queue_size=256)
    runtime = app.state.runtime  # type: ignore[attr-defined]
    loop = app.state.loop  # type: ignore[attr-defined]
    request = raw_request("/predict", png(), "image/png", "t")

    def tasks_on_server_loop() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), loop).result(BOUND_S)

    tasks_before = tasks_on_server_loop()
    waves, per_wave = 10, 100
    for _ in range(waves):
        engine.gate.clear()
        sockets = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(per_wave)]
        for sock in sockets:
            sock.sendall(request)
        wait_until(lambda: runtime.in_progress == per_wave, "the wave is queued")
        for sock in sockets:
            sock.close()
        wait_until(lambda: runtime.in_progress == 0, "every request noticed its client left")
        engine.gate.set()
        wait_until(
            lambda: runtime.batcher.depth == 0 and runtime.batcher.in_flight == 0,
            "the queue emptied",
        )
    metrics = metrics_of(url)
    skipped = metric_value(metrics, "resnet_skipped_images_total", {"reason": "abandoned"})
    assert skipped + engine.images_seen == waves * per_wave
    assert skipped >= waves * (per_wave - 2 * 8)  # at most the batches already running ran
    assert metric_value(metrics, "resnet_requests_total", {"status": "499"}) == waves * per_wave
    assert metric_value(metrics, "resnet_requests_in_progress") == 0
    assert metric_value(metrics, "resnet_queue_depth") == 0
    assert tasks_on_server_loop() <= tasks_before
    assert httpx.post(f"{url}/predict", content=png(), headers=PNG).status_code == 200


class SlowEngine(FakeEngine):
    """The engine double at a fixed speed: `per_batch_s` for any batch."""

    per_batch_s: float = 0.05

    def run(self, batch: np.ndarray, alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(self.per_batch_s)
        return super().run(batch, alone)


def test_overload_is_refused_fast_and_accepted_work_completes(resnet18_package: Path) -> None:
    """Three times what the engine can do, open loop, for a few seconds: every request is
    answered, each with 200 or 429 (Retry-After) and nothing else, and afterwards the
    queue is empty and a lone request is served."""
    classes = ModelPackage.load(resnet18_package).manifest.num_classes
    engine = SlowEngine(num_classes=classes)
    settings = Settings(
        model_dir=resnet18_package, max_batch_size=4, max_queue_size=16, request_timeout_ms=5000
    )
    app = create_app(settings, engine_factory=engine.factory)
    capacity = 4 / engine.per_batch_s  # images/s
    request = raw_request("/predict", png(), "image/png", "t")
    with running_server(app) as url:
        result = asyncio.run(
            open_loop("127.0.0.1", port_of(url), [request], 3 * capacity, duration_s=3.0)
        )
        sent = int(sum(result.statuses.values())) + result.errors
        assert result.errors == 0
        assert set(result.statuses) <= {200, 429}, result.statuses
        assert result.statuses.get(429, 0) > 0
        assert result.statuses[200] == engine.images_seen  # all accepted work was served
        metrics = metrics_of(url)
        refused = metric_value(metrics, "resnet_rejections_total", {"reason": "queue_full"})
        assert refused == result.statuses[429]
        assert (
            sum(
                metric_value(metrics, "resnet_requests_total", {"status": str(status)})
                for status in result.statuses
            )
            == sent
        )
        assert metric_value(metrics, "resnet_queue_depth") == 0
        assert app.state.runtime.in_progress == 0  # type: ignore[attr-defined]
        assert httpx.post(f"{url}/predict", content=png(), headers=PNG).status_code == 200


# ---------------------------------------------------------------- shutdown


def test_shutdown_keeps_one_deadline_even_when_work_never_finishes(
    resnet18_package: Path, engine: FakeEngine
) -> None:
    """A request stuck in the engine: the drain wait, uvicorn's graceful shutdown and the
    batcher's close used to take the whole grace period each (3x); now they share it."""
    engine.gate = threading.Event()
    grace_s = 2.0
    settings = Settings(model_dir=resnet18_package, shutdown_grace_s=grace_s)
    app = create_app(settings, engine_factory=engine.factory)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=int(grace_s),
    )
    server = DrainingServer(config, app.state.runtime, grace_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server listens")
        port = server.servers[0].sockets[0].getsockname()[1]
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, "ready")
        stuck = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
        stuck.sendall(raw_request("/predict", png(), "image/png", "t"))
        wait_until(engine.running.is_set, "the engine holds the request")
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(4 * grace_s)
        elapsed = time.monotonic() - started
        print(f"\nshutdown with a stuck request: {elapsed:.2f} s for a {grace_s} s grace")
        assert not thread.is_alive(), "the server did not exit"
        assert elapsed < grace_s + 1.5, f"shutdown took {elapsed:.1f} s for a {grace_s} s grace"
        stuck.close()
    finally:
        engine.gate.set()
        server.should_exit = server.force_exit = True
        thread.join(BOUND_S)
