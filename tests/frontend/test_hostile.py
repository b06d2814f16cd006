"""The hostile-input corpus (tests/frontend/hostile.py) through one real server: the real ResNet-18
package on ONNX Runtime, with small limits.

Every case goes through every input form and endpoint it applies to. Each answer is its
documented status with the JSON error shape and a short message (never an echo of a large
input), or a 200 with one result per image; after each case, a good image still gets its
200. At the end, /metrics must show no 5xx answer and no internal error for the whole run.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.frontend.app import create_app
from tests.frontend.hostile import (
    EMBED,
    ENDPOINTS,
    FORMS,
    LIMITS,
    PREDICT,
    HostileCase,
    corpus,
    encode,
    exif_rotated,
    expand,
    png,
)
from tests.frontend.test_errors import assert_error
from tests.support import metric_value, running_server

CASES = corpus()
SENT = expand(CASES)
# A good image is sent after each case's last request (and throughout the concurrent test).
LAST_OF_CASE = {case.name: (form, endpoint) for case, form, endpoint in SENT}
MAX_MESSAGE_CHARS = 300
PROBE = png(24, 24)
probes_sent = [0]  # good requests this module has sent: /metrics must count at least these


@pytest.fixture(scope="module")
def http(resnet18_package: Path) -> Iterator[httpx.Client]:
    settings = Settings(
        model_dir=resnet18_package, max_batch_size=4, warmup_batch_sizes=[1], **LIMITS
    )
    with (
        running_server(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def send(http: httpx.Client, case: HostileCase, form: str, endpoint: str) -> httpx.Response:
    request = case.build(form, endpoint)
    return http.post(
        endpoint, content=request.content, headers=request.headers, params=request.params
    )


def assert_results(response: httpx.Response, endpoint: str, images: int) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if endpoint == PREDICT:
        assert len(body["predictions"]) == images
        for labels in body["predictions"]:
            assert labels
            assert all(np.isfinite(label["score"]) for label in labels)
    else:
        assert len(body["embeddings"]) == images
        assert all(len(vector) == body["dim"] for vector in body["embeddings"])
        assert np.isfinite(np.asarray(body["embeddings"])).all()


def assert_still_serving(http: httpx.Client) -> None:
    probes_sent[0] += 1
    probe = http.post("/predict?top_k=1", content=PROBE, headers={"content-type": "image/png"})
    assert probe.status_code == 200, probe.text


def test_the_corpus_covers_every_form_and_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    for form in FORMS:
        assert sum(1 for _, f, _ in SENT if f == form) >= 50, form
    for endpoint in ENDPOINTS:
        assert sum(1 for _, _, e in SENT if e == endpoint) >= 100, endpoint
    valid = sum(1 for case in CASES if case.status == 200)
    with capsys.disabled():
        print(
            f"\nhostile corpus: {len(CASES)} cases ({valid} valid odd inputs), "
            f"{len(SENT)} requests over {len(FORMS)} forms x {len(ENDPOINTS)} endpoints"
        )


@pytest.mark.parametrize(
    ("case", "form", "endpoint"),
    [
        pytest.param(case, form, endpoint, id=f"{case.name}|{form}|{endpoint}")
        for case, form, endpoint in SENT
    ],
)
def test_hostile_input_gets_its_documented_answer(
    http: httpx.Client, case: HostileCase, form: str, endpoint: str
) -> None:
    response = send(http, case, form, endpoint)
    if case.code is None:
        assert_results(response, endpoint, case.build(form, endpoint).images)
    else:
        assert case.status < 500
        assert_error(response, case.status, case.code)
        message = response.json()["error"]["message"]
        assert len(message) < MAX_MESSAGE_CHARS, message
    if LAST_OF_CASE[case.name] == (form, endpoint):
        assert_still_serving(http)


def embedding(http: httpx.Client, data: bytes, media: str) -> np.ndarray:
    response = http.post(EMBED, content=data, headers={"content-type": media})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"][0], dtype=np.float64)


def predictions(http: httpx.Client, data: bytes, media: str) -> list[dict]:
    response = http.post(PREDICT, content=data, headers={"content-type": media})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_rotated_photo_gives_the_upright_photos_answer(
    http: httpx.Client, photo_images: dict[str, Image.Image], orientation: int
) -> None:
    """Lossless (PNG with an eXIf chunk): the same pixels once turned upright, so the same
    predictions and embedding as the upright photo's."""
    upright = photo_images["chelsea.png"]
    straight = encode(upright, "PNG")
    rotated = exif_rotated(upright, "PNG", orientation)
    assert rotated != straight
    turned = predictions(http, rotated, "image/png")
    expected = predictions(http, straight, "image/png")
    assert [label["index"] for label in turned] == [label["index"] for label in expected]
    assert [label["score"] for label in turned] == pytest.approx(
        [label["score"] for label in expected], abs=1e-6
    )
    np.testing.assert_allclose(
        embedding(http, rotated, "image/png"), embedding(http, straight, "image/png"), atol=1e-5
    )


def test_an_exif_rotated_jpeg_is_turned_upright(
    http: httpx.Client, photo_images: dict[str, Image.Image]
) -> None:
    """A JPEG re-encodes its pixels, so only close: far closer to the upright photo than the
    same stored pixels without their orientation tag."""
    upright = photo_images["chelsea.png"]
    straight = embedding(http, encode(upright, "JPEG", quality=95), "image/jpeg")
    tagged = embedding(http, exif_rotated(upright, "JPEG"), "image/jpeg")
    untagged = embedding(
        http, encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95), "image/jpeg"
    )
    assert np.linalg.norm(tagged - straight) < 0.25 * np.linalg.norm(untagged - straight)


def test_garbage_after_the_jpeg_end_marker_changes_nothing(http: httpx.Client) -> None:
    clean = encode(Image.open(io.BytesIO(png(96, 64))), "JPEG", quality=90)
    padded = clean + b"\x00trailing garbage" * 100
    np.testing.assert_allclose(
        embedding(http, padded, "image/jpeg"), embedding(http, clean, "image/jpeg"), atol=1e-6
    )


def test_an_image_url_is_refused_and_never_fetched(http: httpx.Client) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        urls = [f"http://127.0.0.1:{port}/cat.jpg", f"https://127.0.0.1:{port}/cat.jpg"]
        for url in urls:
            response = http.post(PREDICT, json={"images": [url]})
            assert_error(response, 400, "invalid_image")
            assert "base64" in response.json()["error"]["message"]
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody came


async def as_async(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def test_bad_requests_in_flight_never_disturb_good_ones(http: httpx.Client) -> None:
    """Every error case at once, 8 at a time, beside a stream of good requests: each good
    one gets exactly the answer it gets alone."""
    images = [png(40 + 8 * i, 40) for i in range(6)]
    alone = [embedding(http, data, "image/png") for data in images]
    errors = [(case, form, endpoint) for case, form, endpoint in SENT if case.code is not None]

    async def scenario() -> tuple[list[tuple[str, int]], list[httpx.Response]]:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=60) as client:

            async def bad(case: HostileCase, form: str, endpoint: str) -> tuple[str, int]:
                request = case.build(form, endpoint)
                content = request.content
                if not isinstance(content, bytes):
                    content = as_async(content)
                async with limit:
                    response = await client.post(
                        endpoint,
                        content=content,
                        headers=request.headers,
                        params=request.params,
                    )
                return case.name, response.status_code

            async def good(index: int) -> httpx.Response:
                async with limit:
                    return await client.post(
                        EMBED, content=images[index % 6], headers={"content-type": "image/png"}
                    )

            answers = asyncio.gather(*(bad(*sent) for sent in errors))
            goods = asyncio.gather(*(good(i) for i in range(24)))
            return await answers, await goods

    answers, goods = asyncio.run(scenario())
    expected = {case.name: case.status for case, _, _ in errors}
    assert [(name, status) for name, status in answers if status != expected[name]] == []
    for index, response in enumerate(goods):
        assert response.status_code == 200, response.text
        vector = np.asarray(response.json()["embeddings"][0])
        np.testing.assert_allclose(vector, alone[index % 6], atol=1e-4)


def test_no_server_error_in_the_whole_run(http: httpx.Client) -> None:
    """Runs last: /metrics counts every answer of this module's server."""
    assert_still_serving(http)
    text = http.get("/metrics").text
    server_errors = [
        line
        for line in text.splitlines()
        if line.startswith("resnet_requests_total{") and 'status="5' in line
        if float(line.rpartition(" ")[2]) > 0
    ]
    assert server_errors == []
    assert metric_value(text, "resnet_rejections_total", {"reason": "internal"}) == 0
    answered = sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("resnet_requests_total{")
    )
    assert answered >= probes_sent[0]
