"""The `resnet-serve` process itself: no torch, configuration errors, SIGTERM draining."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from loadtests.server import free_port, wait_ready
from service.cli import build_parser, main
from service.config import Settings
from tests.support import metric_value

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server_process(command: list[str], port: int) -> Iterator[subprocess.Popen[str]]:
    """Start the server and wait (bounded) until /readyz answers 200."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        try:
            wait_ready(process, port, 60, "its output follows")
        except RuntimeError as exc:
            process.kill()
            raise AssertionError(f"{exc}:\n{process.communicate()[0]}") from exc
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_server_starts_and_answers_without_torch(
    resnet18_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    port = free_port()
    script = ROOT / "tests" / "scripts" / "serve_without_torch.py"
    command = [
        sys.executable,
        str(script),
        "--model-dir",
        str(resnet18_package),
        "--port",
        str(port),
    ]
    with server_process(command, port) as process:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            data = next(iter(photo_jpegs.values()))
            response = http.post("/predict", content=data, headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"][0]) == 5
            assert http.get("/info").json()["model"]["trained"] is False
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "export-stack modules loaded: []" in output
    assert "THIS MODEL IS UNTRAINED" in output


def test_sigterm_drains_every_accepted_request(
    resnet18_package: Path, distinct_jpegs: list[bytes]
) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli",
        "--model-dir", str(resnet18_package),
        "--port", str(port),
        "--max-batch-size", "4",
        "--shutdown-grace-s", "60",
    ]  # fmt: skip
    accepted_count = 16
    files = [("files", (f"{i}.jpg", distinct_jpegs[i], "image/jpeg")) for i in range(4)]

    async def scenario(process: subprocess.Popen[str]) -> None:
        limits = httpx.Limits(max_connections=64)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            accepted = [
                asyncio.ensure_future(http.post("/predict", files=files))
                for _ in range(accepted_count)
            ]
            for _ in range(1000):  # until every one of them is in progress (bounded)
                metrics = (await http.get("/metrics")).text
                if metric_value(metrics, "resnet_requests_in_progress") >= accepted_count:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("requests were never all in progress")
            process.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=url, timeout=30) as late_client:
                try:
                    late = await late_client.post("/predict", files=files)
                    assert late.status_code == 503, late.text
                    assert late.json()["error"]["code"] == "draining"
                    ready = await late_client.get("/readyz")
                    assert ready.status_code == 503
                except httpx.TransportError:
                    pass  # the drain already finished and the listener is closed: never accepted
            responses = await asyncio.gather(*accepted)
        for response in responses:
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"]) == 4

    with server_process(command, port) as process:
        asyncio.run(scenario(process))
        output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert f"the {accepted_count} request(s) in progress at SIGTERM were answered" in output


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("RESNET_SERVE_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("RESNET_SERVE_WARMUP_BATCH_SIZES", "1,4")
    from_env = Settings()
    assert from_env.max_batch_size == 16
    assert from_env.providers == ["CPUExecutionProvider"]
    assert from_env.warmup_batch_sizes == [1, 4]
    args = vars(build_parser().parse_args(["--max-batch-size", "32", "--no-access-log"]))
    from_flags = Settings(**args)
    assert from_flags.max_batch_size == 32
    assert from_flags.access_log is False
    assert from_flags.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        ([], {"RESNET_SERVE_MAX_QUEUE_SIZE": "lots"}, "max_queue_size"),
        (["--warmup-batch-sizes", "64"], {}, "warmup_batch_sizes"),
        (["--model-dir", "/nonexistent/model"], {}, "manifest.json is missing"),
    ],
)
def test_bad_configuration_exits_2_with_a_message(
    argv: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_setting_with_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout
        assert f"RESNET_SERVE_{name.upper()}" in result.stdout.replace("\n", " ").replace(" ", "")
