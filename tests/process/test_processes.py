"""The multi-process server as it runs in production: `python -m service.cli` with one
engine process and several front-ends, against real packages, with real faults:
`kill -9` of a front-end or of the engine under load, SIGTERM under load, too little
shared memory. After each, /dev/shm holds nothing of ours."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtests.server import free_port
from tests.process.servers import JPEG, ROOT, multi_process_server
from tests.support import metric_value


def info_on_new_connection(url: str) -> dict[str, object]:
    with httpx.Client(base_url=url, timeout=10) as http:
        return http.get("/info").json()  # type: ignore[no-any-return]


def pinned_clients(url: str, wanted_pids: int, most: int = 64) -> dict[int, list[httpx.Client]]:
    """Keep-alive clients of one connection each, grouped by the front-end that accepted
    their connection (the kernel spreads new connections over the front-ends)."""
    clients: dict[int, list[httpx.Client]] = {}
    for _ in range(most):
        client = httpx.Client(
            base_url=url,
            timeout=30,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        pid = int(client.get("/info").json()["processes"]["frontend_pid"])
        clients.setdefault(pid, []).append(client)
        if len(clients) >= wanted_pids and all(len(group) >= 2 for group in clients.values()):
            break
    assert len(clients) == wanted_pids, f"connections reached {len(clients)} front-end(s)"
    return clients


def test_front_ends_share_the_port_and_the_whole_server_answers_for_its_metrics(
    cheap_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    bodies = list(photo_jpegs.values())
    with multi_process_server(cheap_package) as (process, url):
        info = info_on_new_connection(url)
        processes = info["processes"]
        assert isinstance(processes, dict)
        assert processes["workers"] == 2
        assert processes["frontends_connected"] == 2
        engine_pid = processes["engine_pid"]
        assert engine_pid not in (process.pid, processes["frontend_pid"])
        seen_pids, answers = set(), {}
        for index in range(40):
            body = bodies[index % len(bodies)]
            with httpx.Client(base_url=url, timeout=30) as http:  # a new connection each
                seen_pids.add(http.get("/info").json()["processes"]["frontend_pid"])
                response = http.post("/predict", content=body, headers=JPEG)
            assert response.status_code == 200, response.text
            answers.setdefault(body, response.json()["predictions"])
            assert response.json()["predictions"] == answers[body]  # same everywhere
        assert len(seen_pids) == 2
        for _ in range(2):  # any front-end gives the whole server's figures
            with httpx.Client(base_url=url, timeout=30) as http:
                text = http.get("/metrics").text
            assert metric_value(text, "resnet_requests_total", {"endpoint": "predict"}) == 40
            assert metric_value(text, "resnet_images_total", {"endpoint": "predict"}) == 40
            assert metric_value(text, "resnet_batch_size_sum") == 40
            assert metric_value(text, "resnet_queue_depth") == 0
            assert metric_value(text, "resnet_ready") == 1
            assert text.count("resnet_model_info{") == 1
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "processes: 1 engine + 2 front-end(s)" in output


def test_a_killed_front_end_is_replaced_while_the_others_serve(
    resnet18_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    body = next(iter(photo_jpegs.values()))
    with multi_process_server(resnet18_package, "--workers", "2", workers=2) as (process, url):
        clients = pinned_clients(url, 2)
        victim, survivor = sorted(clients)
        outcomes: dict[int, list[str]] = {victim: [], survivor: []}
        stop = threading.Event()

        def load(pid: int, client: httpx.Client) -> None:
            while not stop.is_set():
                try:
                    response = client.post("/predict", content=body, headers=JPEG)
                    outcomes[pid].append(str(response.status_code))
                except httpx.TransportError:
                    outcomes[pid].append("connection error")
                    return

        threads = [
            threading.Thread(target=load, args=(pid, client))
            for pid, group in clients.items()
            for client in group
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = None
        while time.monotonic() - killed_at < 5.0 and replacement is None:
            try:
                pid = info_on_new_connection(url)["processes"]["frontend_pid"]  # type: ignore[index]
            except httpx.TransportError:
                continue
            if pid not in clients:
                replacement = pid
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)
        for group in clients.values():
            for client in group:
                client.close()
        assert replacement is not None, "no replacement front-end answered within 5 s"
        assert outcomes[survivor], "the surviving front-end served nothing"
        assert set(outcomes[survivor]) == {"200"}, outcomes[survivor]
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/predict", content=body, headers=JPEG).status_code == 200
            assert metric_value(http.get("/metrics").text, "resnet_queue_depth") == 0
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"front-end 0 (pid {victim}) exited" in output or f"(pid {victim}) exited" in output


def test_when_the_engine_is_killed_every_request_in_flight_is_answered_and_the_server_exits(
    resnet18_package: Path, distinct_jpegs: list[bytes]
) -> None:
    grace_s = 15
    flags = ("--max-batch-size", "2", "--shutdown-grace-s", str(grace_s))
    with multi_process_server(resnet18_package, *flags) as (process, url):
        engine_pid = info_on_new_connection(url)["processes"]["engine_pid"]  # type: ignore[index]
        files = [("files", (f"{i}.jpg", distinct_jpegs[i], "image/jpeg")) for i in range(8)]

        async def scenario() -> tuple[list[httpx.Response], float]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                sent = [
                    asyncio.ensure_future(http.post("/predict", files=files)) for _ in range(16)
                ]
                for _ in range(500):
                    text = (await http.get("/metrics")).text
                    if metric_value(text, "resnet_requests_in_progress") >= 16:
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the requests were never all in progress")
                os.kill(int(engine_pid), signal.SIGKILL)  # type: ignore[call-overload]
                killed_at = time.monotonic()
                responses = await asyncio.gather(*sent)
                return responses, time.monotonic() - killed_at

        responses, answered_in_s = asyncio.run(scenario())
        assert answered_in_s < 2.0
        codes = {
            response.json()["error"]["code"]
            for response in responses
            if response.status_code != 200
        }
        assert codes == {"engine_unavailable"}, [r.text for r in responses]
        assert all(r.status_code in (200, 503) for r in responses)
        with httpx.Client(base_url=url, timeout=5) as http:
            try:
                assert http.get("/healthz").status_code == 503
                assert http.get("/readyz").status_code == 503
            except httpx.TransportError:
                pass  # already gone
        started = time.monotonic()
        output, _ = process.communicate(timeout=grace_s + 10)
        assert time.monotonic() - started < grace_s
    assert process.returncode != 0, output
    assert "the engine process exited" in output


def test_sigterm_under_load_drains_every_front_end_and_cuts_nothing(
    resnet18_package: Path, distinct_jpegs: list[bytes]
) -> None:
    """A steady stream over new connections through SIGTERM: each request is answered
    (200), refused with 503 `draining`, or never accepted; every front-end's access log
    (one stdout for all) shows exactly the answers the clients got."""
    flags = ("--shutdown-grace-s", "20", "--access-log")
    outcomes: dict[str, int] = {}
    with multi_process_server(resnet18_package, *flags) as (process, url):

        async def one(index: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                try:
                    response = await http.post(
                        "/predict", content=distinct_jpegs[index % 16], headers=JPEG
                    )
                    outcome = str(response.status_code)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    outcome = "not accepted"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def stream() -> None:
            sent = []
            for index in range(100):
                sent.append(asyncio.ensure_future(one(index)))
                if index == 40:
                    process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*sent), 90)

        asyncio.run(stream())
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert set(outcomes) <= {"200", "503", "not accepted"}, outcomes
    assert outcomes.get("200", 0) >= 30, outcomes
    for status in ("200", "503"):
        logged = output.count(f'"POST /predict HTTP/1.1" {status}')
        assert logged == outcomes.get(status, 0), (status, outcomes, output[-3000:])
    assert output.count("request(s) in progress at SIGTERM were answered") == 2


def test_too_little_shared_memory_is_refused_at_start_in_one_line(cheap_package: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--model-dir",
            str(cheap_package),
            "--workers",
            "2",
            "--max-buffered-bytes",
            str(1 << 50),
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert "/dev/shm" in line
    assert "Traceback" not in result.stderr


def test_grpc_and_the_separate_metrics_port_work_across_front_ends(
    cheap_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    """Every front-end serves the v2 gRPC port too (grpcio shares it with SO_REUSEPORT);
    the separate metrics port, served by the engine process, counts all of them."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    grpc_port, metrics_port = free_port(), free_port()
    flags = ("--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port))
    jpeg = next(iter(photo_jpegs.values()))
    with multi_process_server(cheap_package, *flags) as (process, url):
        answers = set()
        for _ in range(10):  # a new channel each: connections spread over the front-ends
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            assert client.is_server_live()
            images = grpcclient.InferInput("image_bytes", [1], "BYTES")
            images.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
            result = client.infer(
                "cheap-engine",
                [images],
                outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)],
            )
            top = result.as_numpy("logits")[0]
            assert len(top) == 3
            answers.add(tuple(top))
            client.close()
        assert len(answers) == 1
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert (
            metric_value(text, "resnet_requests_total", {"endpoint": "v2_grpc", "status": "200"})
            == 10
        )
        assert metric_value(text, "resnet_batch_size_sum") == 10
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/metrics").status_code == 404  # only on its own port
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
