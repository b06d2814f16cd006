"""Overload scenario: open-loop arrivals at a multiple of the measured saturation.

`python -m loadtests.overload` (or `make overload`) starts `resnet-serve` with its default
settings, measures its saturation throughput (closed loop), a lone request's latency and
its RSS, then offers `--factor` x saturation (default 3x) as Poisson arrivals for
`--duration-s` (default 60 s), and measures again. It reports what an operator must know
of a server under overload: is it still up, how fast are the excess requests refused, do
the accepted ones finish within their deadline, how much of the saturation throughput is
still delivered, and does it come back to normal afterwards (latency, memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.cli import ensure_package, machine
from loadtests.client import closed_loop, open_loop, raw_request
from loadtests.images import small_jpegs
from loadtests.server import running_server
from service.config import Settings


def status_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status (VmRSS, VmHWM, ...), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def lone_latency_ms(url: str, body: bytes, count: int = 20) -> float:
    """Median latency of `count` requests sent one at a time."""
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.post("/predict", content=body, headers={"content-type": "image/jpeg"})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return float(np.median(latencies) * 1000)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = np.asarray(values) * 1000
    return {q: round(float(np.percentile(ms, p)), 2) for q, p in (("p50", 50), ("p99", 99))} | {
        "max": round(float(ms.max()), 2)
    }


async def scenario(host: str, port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://{host}:{port}"
    bodies = small_jpegs()
    requests = [raw_request("/predict", body, "image/jpeg", host) for body in bodies]
    saturation = await closed_loop(host, port, requests, args.concurrency, 10.0, warmup_s=2.0)
    capacity = saturation.requests_per_s
    lone_before = lone_latency_ms(url, bodies[0])
    rss_before = status_bytes(pid)
    offered = args.factor * capacity
    overload = await open_loop(host, port, requests, offered, args.duration_s, seed=1)
    rss_after = status_bytes(pid)
    lone_after = lone_latency_ms(url, bodies[0])
    deadline_s = Settings.model_fields["request_timeout_ms"].default / 1000
    accepted = overload.latencies_by_status_s.get(200, [])
    return {
        "saturation_requests_per_s": round(capacity, 2),
        "offered_requests_per_s": round(offered, 2),
        "duration_s": round(overload.duration_s, 1),
        "sent": sum(overload.statuses.values()) + overload.errors,
        "statuses": {str(status): count for status, count in sorted(overload.statuses.items())},
        "connection_errors": overload.errors,
        "accepted_requests_per_s": round(overload.requests_per_s, 2),
        "accepted_over_saturation": round(overload.requests_per_s / capacity, 3),
        "accepted_latency_ms": percentiles_ms(accepted),
        "accepted_within_deadline": all(latency < deadline_s for latency in accepted),
        "refused_latency_ms": percentiles_ms(overload.latencies_by_status_s.get(429, [])),
        "lone_latency_ms_before": round(lone_before, 2),
        "lone_latency_ms_after": round(lone_after, 2),
        "rss_mb_before": round(rss_before / 2**20, 1),
        "rss_mb_after": round(rss_after / 2**20, 1),
        "rss_after_over_before": round(rss_after / rss_before, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / saturation")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/overload.json"))
    args = parser.parse_args(argv)
    ensure_package(args.model_dir, ["fp32", args.precision])
    log_path = args.out.with_suffix(".server.log")
    with running_server(args.model_dir, args.precision, [], log_path) as (host, port, pid):
        report = asyncio.run(scenario(host, port, pid, args))
    report = {"machine": machine(), "precision": args.precision, **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
