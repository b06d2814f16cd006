"""The benchmark's own pieces: the naive baseline does the same work as the service (so a
ratio to it measures batching, not a difference in work), and the open-loop summary."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtests import client
from loadtests.client import LoadResult, arrival_offsets, machine_times
from loadtests.naive import create_naive_app
from loadtests.openloop import summarise
from service.config import Settings
from service.frontend.app import create_app
from service.model_package import Precision
from tests.support import running_server


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8])
def test_the_naive_baseline_answers_as_the_service_does(
    resnet18_package: Path, distinct_jpegs: list[bytes], precision: Precision
) -> None:
    service = create_app(Settings(model_dir=resnet18_package, precision=precision))
    naive = create_naive_app(resnet18_package, precision)
    with running_server(service) as service_url, running_server(naive, wait_loaded=False) as url:
        for jpeg in distinct_jpegs[:3]:
            headers = {"content-type": "image/jpeg"}
            expected = httpx.post(f"{service_url}/predict", content=jpeg, headers=headers)
            got = httpx.post(f"{url}/predict", content=jpeg, headers=headers)
            assert got.status_code == expected.status_code == 200
            ours = expected.json()["predictions"][0]
            theirs = got.json()["predictions"][0]
            assert [p["index"] for p in theirs] == [p["index"] for p in ours]
            assert [p["score"] for p in theirs] == pytest.approx(
                [p["score"] for p in ours], abs=1e-4
            )
        garbage = {"content": b"not an image", "headers": {"content-type": "image/jpeg"}}
        refused = httpx.post(f"{url}/predict", **garbage)  # type: ignore[arg-type]
        assert refused.status_code == httpx.post(f"{service_url}/predict", **garbage).status_code  # type: ignore[arg-type]
        assert refused.status_code == 400


def test_the_summary_is_the_median_of_rounds_with_the_spread_of_ratios() -> None:
    def row(p50: float, p99: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99, "failed": 0, "completed": 100}

    points = {
        "naive": {0.8: [row(10, 100), row(12, 200), row(11, 400)]},
        "svc": {0.8: [row(5, 50), row(6, 160), row(7, 100)]},
    }
    saturation = {
        "naive": {"requests_per_s": 40.0, "rounds": [40.0, 50.0, 40.0]},
        "svc": {"requests_per_s": 46.0, "rounds": [46.0, 50.0, 36.0]},
    }
    summary = summarise(points, "naive", saturation)
    svc = summary["svc"]
    # Per-round saturation ratios 1.15, 1.0, 0.9: the median and the spread come from those.
    assert svc["saturation_over_baseline"] == pytest.approx(1.0)
    assert svc["saturation_over_baseline_min"] == pytest.approx(0.9)
    assert svc["saturation_over_baseline_max"] == pytest.approx(1.15)
    point = svc["loads"]["0.8"]
    assert (point["p50_ms"], point["p99_ms"], point["requests"]) == (6, 100, 300)
    # Per-round ratios 0.5, 0.8, 0.25: the median and the spread come from those.
    assert point["p99_over_baseline"] == pytest.approx(0.5)
    assert (point["p99_over_baseline_min"], point["p99_over_baseline_max"]) == (0.25, 0.8)


def test_an_open_loop_point_sends_its_count_unless_time_runs_out_first() -> None:
    offsets = arrival_offsets(50.0, 60.0, seed=1, count=1000)
    assert len(offsets) == 1000  # about 20 s of arrivals at 50/s: all within the bound
    assert np.all(np.diff(offsets) > 0)
    assert 17 < offsets[-1] < 23
    assert len(arrival_offsets(50.0, 10.0, seed=1, count=1000)) < 600  # cut at 10 s
    # The same seed at another rate: the same sequence, scaled.
    np.testing.assert_allclose(arrival_offsets(100.0, 60.0, seed=1, count=1000), offsets / 2)
    unbounded = arrival_offsets(50.0, 10.0, seed=1)
    assert 400 < len(unbounded) < 600
    assert unbounded[-1] < 10


def test_a_point_reports_the_cpu_the_hypervisor_stole_from_the_machine(tmp_path: Path) -> None:
    # /proc/stat's first line: user nice system idle iowait irq softirq steal, in ticks.
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 100 300 5000 40 20 30 50 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    before = machine_times(stat)
    stat.write_text("cpu  1400 100 500 5600 40 20 80 250 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    after = machine_times(stat)
    assert before is not None
    assert after is not None
    result = LoadResult("open", 10.0, duration_s=2.0, images_per_request=1)
    result.machine = after - before
    tick = os.sysconf("SC_CLK_TCK")
    summary = result.summary()
    assert summary["machine_busy_cores"] == pytest.approx((400 + 200 + 50) / tick / 2, abs=1e-3)
    assert summary["steal_cores"] == pytest.approx(200 / tick / 2, abs=1e-3)
    assert machine_times(tmp_path / "absent") is None
    assert "steal_cores" not in LoadResult("open", 10.0, 2.0, 1).summary()


@pytest.mark.parametrize(("reuse_idle_s", "fresh_connections"), [(100.0, 0), (0.0, 5)])
def test_the_open_loop_reuses_only_connections_idle_a_short_while(
    monkeypatch: pytest.MonkeyPatch, reuse_idle_s: float, fresh_connections: int
) -> None:
    """A connection idle past `REUSE_IDLE_S` is closed and a new one opened: a server
    closing idle connections (uvicorn's 5 s keep-alive) must not fail the next request."""
    monkeypatch.setattr(client, "REUSE_IDLE_S", reuse_idle_s)
    accepted = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
        finally:
            writer.close()

    async def scenario() -> client.LoadResult:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            request = client.raw_request("/", b"", "text/plain", f"127.0.0.1:{port}")
            return await client.open_loop("127.0.0.1", port, [request], 50.0, 5.0, count=5)

    result = asyncio.run(scenario())
    assert result.completed == 5
    assert result.failed == 0
    assert accepted == 8 + fresh_connections  # 8 opened up front
