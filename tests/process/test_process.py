"""The `resnet-serve` process itself: no torch, configuration errors, SIGTERM draining."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.overload import status_bytes
from loadtests.server import free_port, wait_ready
from service.cli import build_parser, main
from service.config import ENV_ONLY, Settings
from tests.support import metric_value

ROOT = Path(__file__).resolve().parents[2]
JPEG = {"content-type": "image/jpeg"}
PNG = {"content-type": "image/png"}


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
    script = ROOT / "tests" / "process" / "scripts" / "serve_without_torch.py"
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
    # Each front-end reports its own share of the requests in progress.
    answered = re.findall(r"the (\d+) request\(s\) in progress at SIGTERM were answered", output)
    assert answered, output
    assert sum(int(count) for count in answered) == accepted_count, output


def test_sigterm_under_load_answers_or_refuses_every_request_and_cuts_none(
    resnet18_package: Path, distinct_jpegs: list[bytes]
) -> None:
    """A steady stream through SIGTERM: every request sent is either answered (200),
    refused with 503 `draining`, or never accepted (the connection refused or closed
    before the server read a request, once the listener shuts). The server's own access
    log proves nothing was cut: it answered exactly the 200s and 503s the clients got."""
    port = free_port()
    grace_s = 20
    command = [
        sys.executable, "-m", "service.cli",
        "--model-dir", str(resnet18_package),
        "--port", str(port),
        "--shutdown-grace-s", str(grace_s),
        "--access-log",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    outcomes: dict[str, int] = {}

    async def one(index: int) -> None:
        body = distinct_jpegs[index % len(distinct_jpegs)]
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # no pooled sockets
            try:
                response = await http.post("/predict", content=body, headers=JPEG)
                outcome = str(response.status_code)
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "draining"
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                outcome = "not accepted"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def stream(process: subprocess.Popen[str]) -> int:
        sent: list[asyncio.Task[None]] = []
        for index in range(120):  # ~6 s of arrivals at 20/s, SIGTERM a third of the way in
            sent.append(asyncio.ensure_future(one(index)))
            if index == 40:
                process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*sent), 90)
        return len(sent)

    started = time.monotonic()
    with server_process(command, port) as process:
        sent = asyncio.run(stream(process))
        output, _ = process.communicate(timeout=grace_s + 10)
    assert time.monotonic() - started < 60 + grace_s
    print(f"\nSIGTERM under a stream: {sent} sent, outcomes {outcomes}")
    assert process.returncode == 0, output
    assert set(outcomes) <= {"200", "503", "not accepted"}, outcomes
    assert sum(outcomes.values()) == sent
    assert outcomes.get("200", 0) >= 30, outcomes  # the ones before SIGTERM were served
    for status in ("200", "503"):
        logged = output.count(f'"POST /predict HTTP/1.1" {status}')
        assert logged == outcomes.get(status, 0), (status, outcomes, output[-3000:])
    assert "request(s) in progress at SIGTERM were answered" in output


def _corrupted_copy(package: Path, destination: Path, keep_hash: bool) -> Path:
    """The package with its FP32 graph truncated; with `keep_hash`, the manifest updated
    to match (a broken graph that passes the hash check, so loading it must fail)."""
    shutil.copytree(package, destination)
    graph = destination / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:4096])
    if keep_hash:
        manifest = json.loads((destination / "manifest.json").read_text())
        variant = manifest["variants"]["fp32"]
        variant["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
        variant["bytes"] = graph.stat().st_size
        (destination / "manifest.json").write_text(json.dumps(manifest))
    return destination


@pytest.mark.parametrize(
    ("keep_hash", "message"),
    [(False, "model.onnx is 4096 bytes; the manifest says"), (True, "model failed to load")],
    ids=["hash-mismatch", "corrupt-graph"],
)
def test_a_corrupt_package_exits_non_zero_and_never_turns_ready(
    resnet18_package: Path, tmp_path: Path, keep_hash: bool, message: str
) -> None:
    package = _corrupted_copy(resnet18_package, tmp_path / "package", keep_hash)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "--model-dir",
        str(package),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ready_seen = False
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for _ in range(600):  # bounded: until the process exits
            if process.poll() is not None:
                break
            with suppress(httpx.TransportError):
                ready_seen |= http.get("/readyz").status_code == 200
            time.sleep(0.05)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 1, output
    assert not ready_seen
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert any(message in line for line in errors), output
    assert len([line for line in errors if "failed to load" in line]) == 1


def test_a_burst_of_huge_16_bit_pngs_stays_within_its_memory_bound(resnet18_package: Path) -> None:
    """16 concurrent requests, each a ~80 KB 16-bit 6000x6000 PNG, with default settings:
    the server's peak RSS may rise by at most 1.5 GB (it rose by 2.5 GB before decodes
    shared a pixel budget and deep images stopped going through float64)."""
    rows, cols = np.mgrid[0:6000, 0:6000]
    samples = ((cols // 500 + rows // 500) % 2 * 40000 + 1000).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "PNG", optimize=True)
    data = buffer.getvalue()
    assert len(data) < 120_000
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "--model-dir",
        str(resnet18_package),
        "--port",
        str(port),
    ]

    async def burst(pid: int) -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            await http.post("/predict", content=data, headers=PNG)  # first-use allocations
            before = status_bytes(pid, "VmRSS")
            responses = await asyncio.gather(
                *(http.post("/predict", content=data, headers=PNG) for _ in range(16))
            )
            rise = status_bytes(pid, "VmHWM") - before
            assert rise <= 1.5 * 2**30, f"peak RSS rose by {rise / 2**20:.0f} MB"
            return [response.status_code for response in responses]

    with server_process(command, port) as process:
        statuses = asyncio.run(burst(process.pid))
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert statuses == [200] * 16


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
        # deploy/README once suggested --metrics-port 8001, the chart's gRPC port.
        (["--grpc-port", "8001", "--metrics-port", "8001"], {}, "metrics_port (8001) is the same"),
        (["--port", "9000"], {"RESNET_SERVE_GRPC_PORT": "9000"}, "grpc_port (9000) is the same"),
        (["--metrics-port", "8000"], {}, "metrics_port (8000) is the same port as port"),
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
    flags = set(re.findall(r"--[a-z0-9-]+", result.stdout))
    for name in Settings.model_fields:
        if name in ENV_ONLY:  # secrets: an environment variable, never a flag
            assert f"--{name.replace('_', '-')}" not in flags
        else:
            assert f"--{name.replace('_', '-')}" in flags
        assert f"RESNET_SERVE_{name.upper()}" in result.stdout.replace("\n", " ").replace(" ", "")
