"""The Python client (service/client) against live servers: the real service on an exported
ResNet-18, the service over a gated engine double (queue full, timeouts, API keys), and a
scripted server that answers what each test tells it to (retries)."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from service.client import (
    AsyncClient,
    BadInput,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    Overloaded,
    Prediction,
    RetryPolicy,
    ServerFault,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from service.client.errors import retry_after
from service.config import Settings
from service.frontend.app import create_app
from service.model_package import ModelPackage
from tests.support import FakeEngine, metric_value, png, running_server

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 20.0
FAST = RetryPolicy(retries=3, budget_s=5.0, backoff_s=0.001, max_backoff_s=0.01)


def as_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------- the real service


@pytest.fixture(scope="module")
def real_url(resnet18_package: Path) -> Iterator[str]:
    settings = Settings(model_dir=resnet18_package, precision="fp32", max_batch_size=8)
    with running_server(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(real_url: str) -> Iterator[Client]:
    with Client(real_url, retries=0) as http:
        yield http


@pytest.fixture(scope="module")
def photos(photo_jpegs: dict[str, bytes]) -> list[bytes]:
    return list(photo_jpegs.values())[:3]


def raw_predict(url: str, images: list[bytes], top_k: int) -> list[list[Prediction]]:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(f"{url}/predict", params={"top_k": top_k}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return [[Prediction(**p) for p in image] for image in response.json()["predictions"]]


def raw_embed(url: str, images: list[bytes], normalize: bool) -> np.ndarray:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    params = {"normalize": str(normalize).lower()}
    response = httpx.post(f"{url}/embed", params=params, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"], dtype=np.float32)


def test_predict_equals_the_raw_response(client: Client, real_url: str, photos: list) -> None:
    got = client.predict(photos, top_k=3)
    raw = raw_predict(real_url, photos, 3)
    assert len(got) == len(photos)
    for mine, theirs in zip(got, raw, strict=True):
        assert all(isinstance(p, Prediction) for p in mine)
        assert [(p.index, p.label) for p in mine] == [(p.index, p.label) for p in theirs]
        assert [p.score for p in mine] == pytest.approx([p.score for p in theirs], rel=1e-5)
        assert mine[0].score >= mine[1].score >= mine[2].score
    default = client.predict(photos[0])  # one image, the server's default top_k
    assert len(default) == 1
    assert len(default[0]) == 5


@pytest.mark.parametrize("normalize", [True, False])
def test_embed_equals_the_raw_response(
    client: Client, real_url: str, photos: list, normalize: bool
) -> None:
    got = client.embed(photos, normalize=normalize)
    raw = raw_embed(real_url, photos, normalize)
    assert got.dtype == np.float32
    assert got.shape == raw.shape == (len(photos), 512)
    np.testing.assert_allclose(got, raw, rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) is normalize
    # One image, one engine run each way: the base64 floats are the JSON floats exactly.
    np.testing.assert_array_equal(
        client.embed(photos[0], normalize=normalize), raw_embed(real_url, photos[:1], normalize)
    )


def test_every_kind_of_image_input_is_sent_as_the_same_pixels(
    client: Client, tmp_path: Path, photo_images: dict[str, Image.Image]
) -> None:
    image = next(iter(photo_images.values())).resize((160, 120))
    pixels = np.asarray(image)
    lossless = as_png(image)
    path = tmp_path / "photo.png"
    path.write_bytes(lossless)
    expected = client.embed(lossless)
    for given in (
        str(path),
        path,
        bytearray(lossless),
        memoryview(lossless),
        image,
        image.convert("RGBA").convert("RGB"),
        pixels,
        np.asfortranarray(pixels),
    ):
        np.testing.assert_array_equal(client.embed(given), expected, err_msg=type(given).__name__)
    # Grey: an H x W array, an H x W x 1 array and an "L" image are the same picture.
    grey = image.convert("L")
    grey_expected = client.embed(as_png(grey))
    for given in (grey, np.asarray(grey), np.asarray(grey)[:, :, None]):
        np.testing.assert_array_equal(client.embed(given), grey_expected)
    # A CMYK image cannot be a PNG: it is converted to RGB first, as the server would.
    assert client.embed(image.convert("CMYK")).shape == (1, 512)
    # Several at once: a list, a generator, a 4-D array; results in order.
    flipped = np.ascontiguousarray(pixels[:, ::-1])
    one_by_one = np.concatenate([client.embed(pixels), client.embed(flipped)])
    batch = np.stack([pixels, flipped])
    for many in ([pixels, flipped], (a for a in (pixels, flipped)), batch):
        np.testing.assert_allclose(client.embed(many), one_by_one, rtol=1e-5, atol=1e-6)


def test_images_the_client_cannot_send_are_refused_before_any_request(client: Client) -> None:
    with pytest.raises(ValueError, match="no images"):
        client.predict([])
    with pytest.raises(ValueError, match="uint8"):
        client.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        client.predict(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"images\[1\] is a int"):
        client.predict([png(), 42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"images\[0\] is a int"):
        client.predict(42)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        client.predict("/nonexistent/cat.jpg")


def test_service_errors_are_typed_and_carry_the_code(client: Client) -> None:
    with pytest.raises(BadInput) as caught:
        client.predict([png(), b"not an image"])
    error = caught.value
    assert (error.status, error.code) == (400, "invalid_image")
    assert error.message.startswith("image 1:")
    assert error.request_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}", error.request_id)  # the id the client sent
    assert error.attempts == 1
    assert "invalid_image" in str(error)
    with pytest.raises(BadInput) as caught:
        client.predict(png(), top_k=0)
    assert (caught.value.status, caught.value.code) == (422, "invalid_parameter")
    with pytest.raises(BadInput) as caught:
        client.embed([png()] * 33)
    assert (caught.value.status, caught.value.code) == (413, "too_many_images")


def test_probes_and_info(client: Client, resnet18_package: Path) -> None:
    assert client.health() is True
    assert client.ready() is True
    info = client.info()
    assert info["model"]["name"] == ModelPackage.load(resnet18_package).manifest.name
    assert info["state"] == "ready"


def test_the_async_client_gives_the_same_results(
    client: Client, real_url: str, photos: list, photo_images: dict[str, Image.Image]
) -> None:
    image = next(iter(photo_images.values()))

    async def calls() -> tuple:
        async with AsyncClient(real_url, retries=0) as aclient:
            return (
                await aclient.predict(photos, top_k=2),
                await aclient.embed([photos[0], image], normalize=False),
                await aclient.health(),
                await aclient.ready(),
                await aclient.info(),
            )

    predictions, vectors, health, ready, info = asyncio.run(calls())
    expected = client.predict(photos, top_k=2)
    assert [[p.index for p in image] for image in predictions] == [
        [p.index for p in image] for image in expected
    ]
    expected_vectors = client.embed([photos[0], image], normalize=False)
    np.testing.assert_allclose(vectors, expected_vectors, rtol=1e-5, atol=1e-6)
    assert (health, ready, info["state"]) == (True, True, "ready")

    async def bad() -> None:
        async with AsyncClient(real_url, retries=0) as aclient:
            await aclient.predict(b"not an image")

    with pytest.raises(BadInput) as caught:
        asyncio.run(bad())
    assert (caught.value.status, caught.value.code) == (400, "invalid_image")


def test_the_readme_example_works_as_written(
    real_url: str, tmp_path: Path, photo_jpegs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's client example, run as it is written there (only the URL differs)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Python client", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8000" in example
    jpegs = list(photo_jpegs.values())
    (tmp_path / "cat.jpg").write_bytes(jpegs[0])
    (tmp_path / "dog.jpg").write_bytes(jpegs[1])
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)
    exec(compile(example.replace("http://127.0.0.1:8000", real_url), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("cat.jpg ")
    assert lines[2].startswith("cosine ")


def test_the_client_imports_nothing_of_the_server() -> None:
    """`resnet-serve[client]` users get httpx; importing the client must not need (or pay
    for) FastAPI, ONNX Runtime, numpy or Pillow."""
    heavy = ("fastapi", "starlette", "onnxruntime", "uvicorn", "pydantic", "numpy", "PIL")
    code = f"import sys, service.client; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


# ---------------------------------------------------------------- the service over a gated engine


@pytest.fixture(scope="module")
def gated(resnet18_package: Path) -> Iterator[tuple[str, FakeEngine]]:
    """One image runs at a time and one may wait; the engine runs only while the gate is
    open. API keys on."""
    engine = FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)
    engine.gate = threading.Event()
    engine.gate.set()
    settings = Settings(
        model_dir=resnet18_package,
        api_keys="secret",
        max_batch_size=1,
        max_queue_size=1,
        max_concurrent_batches=1,
        max_queue_delay_ms=0,
    )
    app = create_app(settings, engine_factory=engine.factory)
    with running_server(app) as url:
        yield url, engine
        engine.gate.set()


@pytest.fixture
def full_queue(gated: tuple[str, FakeEngine]) -> Iterator[str]:
    """The gated server with one image on the engine and one queued: the next is a 429."""
    url, engine = gated
    assert engine.gate is not None
    engine.gate.clear()
    engine.running.clear()
    done: list[int] = []

    def send() -> None:
        with Client(url, api_key="secret", retries=0) as http:
            done.append(len(http.predict(png())))

    senders = [threading.Thread(target=send) for _ in range(2)]
    senders[0].start()
    wait_until(engine.running.is_set, "the first image to reach the engine")
    senders[1].start()
    wait_until(lambda: queued(url) == 1, "the second image to be queued")
    try:
        yield url
    finally:
        engine.gate.set()
        for sender in senders:
            sender.join(BOUND_S)
        assert done == [1, 1]


def queued(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric_value(text, "resnet_queue_depth")


def rejected(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric_value(text, "resnet_rejections_total", {"reason": reason})


def test_api_key_is_sent_and_a_refusal_is_unauthorized(gated: tuple[str, FakeEngine]) -> None:
    url, _ = gated
    with Client(url, api_key="secret") as http:
        assert len(http.predict(png(), top_k=2)[0]) == 2
    for key in (None, "wrong"):
        with Client(url, api_key=key) as http, pytest.raises(Unauthorized) as caught:
            http.embed(png())
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
        assert isinstance(caught.value, BadInput)
        assert caught.value.attempts == 1  # never retried


def test_a_full_queue_is_overloaded_and_a_retry_after_beyond_the_budget_ends_the_call(
    full_queue: str,
) -> None:
    with Client(full_queue, api_key="secret", retries=0) as http, pytest.raises(Overloaded) as c:
        http.predict(png())
    assert (c.value.status, c.value.code, c.value.retry_after_s) == (429, "queue_full", 1.0)
    assert c.value.attempts == 1
    # The server asks for 1 s; a budget of 0.5 s cannot honour it: no retry, no waiting.
    budget = RetryPolicy(retries=5, budget_s=0.5)
    with (
        Client(full_queue, api_key="secret", retries=budget) as http,
        pytest.raises(Overloaded) as c,
    ):
        http.predict(png())
    assert c.value.attempts == 1
    assert rejected(full_queue, "queue_full") >= 2


def test_a_request_refused_by_a_full_queue_is_retried_and_served(
    gated: tuple[str, FakeEngine], full_queue: str
) -> None:
    """Refused while the queue is full, the client waits (the server says 1 s; how long it
    waits is checked by the policy test below) and its retry is served once there is room."""
    _, engine = gated
    assert engine.gate is not None
    before = rejected(full_queue, "queue_full")
    result: list[object] = []

    def call() -> None:
        with Client(full_queue, api_key="secret", retries=RetryPolicy(3, budget_s=10)) as http:
            try:
                result.append(http.predict(png(), top_k=1))
            except ServiceError as error:
                result.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: rejected(full_queue, "queue_full") == before + 1, "the 429")
    engine.gate.set()
    caller.join(BOUND_S)
    assert len(result) == 1
    assert isinstance(result[0], list), result
    assert len(result[0][0]) == 1
    assert rejected(full_queue, "queue_full") == before + 1  # one refusal, then served


def test_the_client_timeout_raises_timeout_and_is_not_retried(
    gated: tuple[str, FakeEngine],
) -> None:
    url, engine = gated
    assert engine.gate is not None
    engine.gate.clear()
    try:
        with (
            Client(url, api_key="secret", timeout=0.3, retries=FAST) as http,
            pytest.raises(Timeout) as caught,
        ):
            http.predict(png())
        error = caught.value
        assert isinstance(error, ConnectionFailed)
        assert (error.status, error.code, error.attempts) == (None, "timeout", 1)
        assert isinstance(error.__cause__, httpx.ReadTimeout)
    finally:
        engine.gate.set()


def test_connection_refused_is_retried_then_raised() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retries=FAST) as http:
        with pytest.raises(ConnectionFailed) as caught:
            http.predict(png())
        assert caught.value.attempts == 4
        assert caught.value.code == "connection_failed"
        assert http.health() is False
        assert http.ready() is False


# ---------------------------------------------------------------- a scripted server


@dataclass
class Script:
    """Replies (status, headers, body) the scripted server gives, in order; then 200s."""

    replies: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    seen: list[httpx.Headers] = field(default_factory=list)


PREDICT_BODY = (
    b'{"model":{},"predictions":[[{"index":3,"label":"three","score":0.75},'
    b'{"index":1,"label":"one","score":0.25}]]}'
)
VECTOR = np.array([0.6, 0.8], dtype="<f4")
EMBED_BODY = (
    b'{"model":{},"embeddings":["'
    + base64.b64encode(VECTOR.tobytes())
    + b'"],"dim":2,"normalized":true,"encoding":"base64"}'
)


def error_body(code: str) -> bytes:
    return b'{"error":{"code":"%s","message":"scripted"}}' % code.encode()


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def reply(request: Request, path: str) -> Response:
        await request.body()
        script.seen.append(request.headers)
        if script.replies:
            status, headers, body = script.replies.pop(0)
        else:
            status, headers, body = 200, {}, EMBED_BODY if path == "embed" else PREDICT_BODY
        return Response(body, status, headers, media_type="application/json")

    with running_server(app, wait_loaded=False) as url:
        yield url, script


@pytest.fixture
def script(scripted: tuple[str, Script]) -> Script:
    scripted[1].replies.clear()
    scripted[1].seen.clear()
    return scripted[1]


def test_429_and_503_are_retried_with_the_same_request_id(
    scripted: tuple[str, Script], script: Script
) -> None:
    busy = (429, {"Retry-After": "0"}, error_body("queue_full"))
    draining = (503, {}, error_body("draining"))
    script.replies[:] = [busy, draining, busy]
    with Client(scripted[0], retries=FAST) as http:
        assert http.predict(png()) == [[Prediction("three", 3, 0.75), Prediction("one", 1, 0.25)]]
    assert len(script.seen) == 4
    assert len({headers["x-request-id"] for headers in script.seen}) == 1


def test_the_retry_budget_is_bounded_and_ends_with_the_typed_error(
    scripted: tuple[str, Script], script: Script
) -> None:
    script.replies[:] = [(503, {"Retry-After": "0"}, error_body("not_ready"))] * 10
    with Client(scripted[0], retries=FAST) as http, pytest.raises(Unavailable) as caught:
        http.embed(png())
    assert (caught.value.status, caught.value.code, caught.value.attempts) == (503, "not_ready", 4)
    assert len(script.seen) == 4
    script.replies[:] = [(429, {"Retry-After": "3600"}, error_body("too_busy"))]
    with Client(scripted[0], retries=FAST) as http, pytest.raises(Overloaded) as caught:
        http.embed(png())
    assert (caught.value.code, caught.value.retry_after_s, caught.value.attempts) == (
        "too_busy",
        3600.0,
        1,
    )


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        ((400, {}, error_body("invalid_image")), BadInput, "invalid_image"),
        ((413, {}, error_body("payload_too_large")), BadInput, "payload_too_large"),
        ((504, {}, error_body("deadline_exceeded")), DeadlineExceeded, "deadline_exceeded"),
        ((500, {}, error_body("inference_failed")), ServerFault, "inference_failed"),
        ((502, {"content-type": "text/html"}, b"<h1>Bad Gateway</h1>"), ServerFault, "http_502"),
    ],
)
def test_other_errors_are_not_retried(
    scripted: tuple[str, Script],
    script: Script,
    reply: tuple[int, dict[str, str], bytes],
    kind: type[ServiceError],
    code: str,
) -> None:
    script.replies[:] = [reply, reply]
    with Client(scripted[0], retries=FAST) as http, pytest.raises(kind) as caught:
        http.predict(png())
    assert (caught.value.status, caught.value.code, caught.value.attempts) == (reply[0], code, 1)
    assert len(script.seen) == 1


def test_a_success_that_is_not_the_service_s_reply_is_a_bad_reply(
    scripted: tuple[str, Script], script: Script
) -> None:
    page = (200, {"content-type": "text/html"}, b"<html>captive portal</html>")
    wrong_dim = (200, {}, EMBED_BODY.replace(b'"dim":2', b'"dim":3'))
    with Client(scripted[0], retries=FAST) as http:
        for reply, call in ((page, http.predict), (page, http.embed), (wrong_dim, http.embed)):
            script.replies[:] = [reply]
            with pytest.raises(ServiceError) as caught:
                call(png())
            assert (caught.value.status, caught.value.code) == (200, "bad_reply")


def test_the_async_client_retries_the_same_way(
    scripted: tuple[str, Script], script: Script
) -> None:
    busy = (429, {"Retry-After": "0"}, error_body("queue_full"))

    async def calls() -> tuple[np.ndarray, ServiceError]:
        async with AsyncClient(scripted[0], retries=FAST) as aclient:
            script.replies[:] = [busy, busy]
            vectors = await aclient.embed(png())
            script.replies[:] = [busy] * 5
            try:
                await aclient.predict(png())
            except Overloaded as error:
                return vectors, error
            raise AssertionError("no error")

    vectors, error = asyncio.run(calls())
    np.testing.assert_array_equal(vectors, VECTOR[None, :])
    assert (error.code, error.attempts) == ("queue_full", 4)
    assert len(script.seen) == 3 + 4


# ---------------------------------------------------------------- the retry policy itself


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_honour_retry_after_back_off_exponentially_and_stay_in_budget() -> None:
    clock = FakeClock()
    policy = RetryPolicy(retries=6, budget_s=20, backoff_s=0.5, max_backoff_s=4)
    attempts = policy.start(clock, random.Random(1))
    waits = []
    for _ in range(5):
        delay = attempts.next_delay(Unavailable("x", status=503))
        assert delay is not None
        waits.append(delay)
        clock.now += delay
    caps = [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped
    assert all(cap / 2 <= wait <= cap for wait, cap in zip(waits, caps, strict=True)), waits
    # Retry-After is the floor, the jitter is added to it, never taken from it.
    attempts = policy.start(clock, random.Random(2))
    delay = attempts.next_delay(Overloaded("x", status=429, retry_after_s=3))
    assert delay is not None
    assert 3 <= delay <= 3.5
    # A wait that would end past the budget ends the call instead.
    clock.now += 19  # 19 s into a 20 s budget: a 1 s Retry-After would pass it
    assert attempts.next_delay(Overloaded("x", status=429, retry_after_s=1)) is None
    # Not retryable, or out of retries: no delay.
    assert policy.start(clock).next_delay(BadInput("x", status=400)) is None
    attempts = RetryPolicy(retries=1).start(clock)
    assert attempts.next_delay(Unavailable("x")) is not None
    error = Unavailable("x")
    assert attempts.next_delay(error) is None
    assert error.attempts == 2


def test_retry_after_header_forms() -> None:
    assert retry_after("2") == 2.0
    assert retry_after(" 1.5 ") == 1.5
    assert retry_after("-1") is None
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: at once
    later = time.time() + 30
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(later))
    assert 25 <= (retry_after(date) or 0) <= 31
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(retries=-1)
