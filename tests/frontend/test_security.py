"""Access and hygiene: optional API keys (environment or a rotated key file), request ids,
JSON logs that never hold a key or an image, and no filesystem paths shown to clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.server import free_port, wait_ready
from service.cli import build_parser, main
from service.config import Settings
from service.frontend.app import create_app
from service.frontend.security import KeyFileError
from service.model_package import ModelPackage
from tests.support import FakeEngine, metric_value, png, running_server

PNG = {"content-type": "image/png"}
ROOT = Path(__file__).resolve().parents[2]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **PNG}


@pytest.fixture
def engine(resnet18_package: Path) -> FakeEngine:
    return FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)


@pytest.fixture
def keyed(resnet18_package: Path, engine: FakeEngine) -> Iterator[httpx.Client]:
    settings = Settings(model_dir=resnet18_package, api_keys="first-key, second-key")
    app = create_app(settings, engine_factory=engine.factory)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_api_keys_guard_inference_and_info_but_not_probes_metrics_or_docs(
    keyed: httpx.Client,
) -> None:
    image = png()
    assert_unauthorized(keyed.post("/predict", content=image, headers=PNG))
    assert_unauthorized(keyed.post("/embed", content=image, headers=bearer("wrong-key")))
    assert_unauthorized(keyed.post("/predict", content=image, headers={"authorization": "Basic x"}))
    assert_unauthorized(keyed.get("/info"))
    for key in ("first-key", "second-key"):  # either of two keys: how a rotation overlaps
        assert keyed.post("/predict", content=image, headers=bearer(key)).status_code == 200
    assert keyed.get("/info", headers=bearer("first-key")).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    metrics = keyed.get("/metrics").text
    assert metric_value(metrics, "resnet_rejections_total", {"reason": "unauthorized"}) == 4


def test_probes_and_metrics_can_require_the_key(resnet18_package: Path, engine: FakeEngine) -> None:
    settings = Settings(
        model_dir=resnet18_package,
        api_keys="k",
        api_key_for_probes=True,
        api_key_for_metrics=True,
    )
    app = create_app(settings, engine_factory=engine.factory)
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert_unauthorized(http.get(path))
            assert http.get(path, headers={"authorization": "Bearer k"}).status_code == 200


def test_a_rotated_key_file_takes_effect_without_a_restart(
    resnet18_package: Path, engine: FakeEngine, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# mounted from a Secret\nold-key\n\n")
    settings = Settings(model_dir=resnet18_package, api_keys_file=key_file)
    app = create_app(settings, engine_factory=engine.factory)
    image = png()
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        assert http.post("/predict", content=image, headers=bearer("old-key")).status_code == 200
        # Kubernetes swaps a Secret's files by renaming a new version into place.
        staged = tmp_path / "keys.new"
        staged.write_text("new-key\n")
        os.replace(staged, key_file)
        assert_unauthorized(http.post("/predict", content=image, headers=bearer("old-key")))
        assert http.post("/predict", content=image, headers=bearer("new-key")).status_code == 200
        # A half-written (empty) file keeps the keys read before: neither open nor locked.
        key_file.write_text("")
        assert http.post("/predict", content=image, headers=bearer("new-key")).status_code == 200
        assert_unauthorized(http.post("/predict", content=image, headers=PNG))


def test_an_unusable_key_file_stops_the_start(resnet18_package: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        create_app(Settings(model_dir=resnet18_package, api_keys_file=tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    with pytest.raises(KeyFileError):
        create_app(Settings(model_dir=resnet18_package, api_keys_file=empty))


def test_keys_are_never_a_flag(
    resnet18_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--api-keys", "secret"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --api-keys" in capsys.readouterr().err
    assert "--api-keys-file" in build_parser().format_help()
    code = main(["--model-dir", str(resnet18_package), "--api-keys-file", str(tmp_path / "no")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("resnet-serve: error: cannot read the API key file")


def test_request_ids_are_returned_and_only_sensible_ones_are_kept(keyed: httpx.Client) -> None:
    given = keyed.get("/healthz", headers={"x-request-id": "gateway-7f3a:1"})
    assert given.headers["x-request-id"] == "gateway-7f3a:1"
    for unwanted in ("x" * 200, "bad id with spaces", ""):
        response = keyed.get("/healthz", headers={"x-request-id": unwanted})
        generated = response.headers["x-request-id"]
        assert generated != unwanted
        assert len(generated) == 32
        int(generated, 16)
    refused = keyed.get("/info", headers={"x-request-id": "abc"})
    assert refused.status_code == 401
    assert refused.headers["x-request-id"] == "abc"  # refusals are traceable too


def test_info_and_probes_show_no_paths(resnet18_package: Path, engine: FakeEngine) -> None:
    app = create_app(Settings(model_dir=resnet18_package), engine_factory=engine.factory)
    with running_server(app) as url, httpx.Client(base_url=url) as http:
        for path in ("/info", "/healthz", "/readyz"):
            text = http.get(path).text
            assert str(resnet18_package) not in text, path
            assert str(resnet18_package.parent) not in text, path


def test_json_logs_carry_the_request_id_and_never_a_key_or_an_image(
    resnet18_package: Path,
) -> None:
    port = free_port()
    key = "k-3f9d2c8e-secret"
    command = [
        sys.executable, "-m", "service.cli",
        "--model-dir", str(resnet18_package),
        "--port", str(port),
        "--log-format", "json",
        "--access-log",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RESNET_SERVE_API_KEYS": key}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    image = png((48, 48), noise=True)
    try:
        wait_ready(process, port, 60, "see its output")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            headers = {**bearer(key), "x-request-id": "trace-me-42"}
            assert http.post("/predict", content=image, headers=headers).status_code == 200
            refused = http.post(
                "/predict", content=image, headers={**PNG, "x-request-id": "no-key-1"}
            )
            assert refused.status_code == 401
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
    served = [record for record in records if record.get("request_id") == "trace-me-42"]
    assert served
    assert any("/predict" in record["message"] for record in served)  # the access line
    assert any(record.get("request_id") == "no-key-1" for record in records)
    assert any("UNTRAINED" in record["message"] for record in records)
    assert key not in output
    assert image[100:140].hex() not in output
