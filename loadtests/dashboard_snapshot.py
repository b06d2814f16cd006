"""Draw the dashboard's main panels from a real run, without Grafana: docs/dashboard.png.

Starts `resnet-serve` (a separate process) and a real Prometheus scraping it every second
with the project's scrape config and rules, drives a bounded load in phases (light,
steady, an overload that fills the queue, a few bad requests, then quiet), and draws the
dashboard's own PromQL over Prometheus range queries with matplotlib.

    python -m loadtests.dashboard_snapshot                 # ~1.5 minutes on 2 cores
    python -m loadtests.dashboard_snapshot --model-dir models/resnet50 --precision int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import images
from loadtests.prometheus import DASHBOARD, Prometheus, running_prometheus
from loadtests.server import running_server

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "dashboard.png"
# Grafana's variables for this short, finely scraped run.
VARIABLES = {"$__rate_interval": "10s", "$__range": "2m", "$job": "resnet-serve", "$pod": ".*"}
JPEG = {"content-type": "image/jpeg"}
PANELS = (
    "Requests by endpoint and status",
    "Request latency p50 / p90 / p99",
    "Images/s",
    "Queue depth vs capacity",
    "Queue wait p50 / p99",
    "Batch size: mean and p90",
    "Inference time per batch",
    "Rejections by reason",
)
# (seconds, concurrent clients, images per request): light, steady, overload, quiet.
PHASES = ((15, 1, 1), (20, 4, 1), (15, 16, 4), (10, 1, 1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.dashboard_snapshot")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="package to serve (default: export a random-init ResNet-18 to a temporary directory)",
    )
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def panel_targets() -> dict[str, list[dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] == "timeseries"}
    return {title: panels[title]["targets"] for title in PANELS}


async def drive(url: str, jpegs: list[bytes]) -> dict[int, int]:
    """The phases, each bounded by its duration (and 2,000 requests per client)."""
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        for seconds, clients, per_request in PHASES:
            stop = time.monotonic() + seconds

            async def client(
                index: int, stop: float = stop, per_request: int = per_request
            ) -> None:
                for n in range(2000):
                    if time.monotonic() > stop:
                        return
                    data = jpegs[(index + n) % len(jpegs)]
                    if n % 4 == 3:
                        files = [("files", ("a.jpg", data, "image/jpeg"))] * per_request
                        response = await http.post("/embed", files=files)
                    elif n % 50 == 7:
                        response = await http.post("/predict", content=b"garbage", headers=JPEG)
                    else:
                        files = [("files", ("a.jpg", data, "image/jpeg"))] * per_request
                        response = await http.post("/predict", files=files)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 429:
                        await asyncio.sleep(0.05)  # a polite client backs off a little

            await asyncio.gather(*(client(i) for i in range(clients)))
            print(f"  phase: {clients} clients x {seconds} s done", flush=True)
    return statuses


def plot(prometheus: Prometheus, start: float, end: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(20, 8))
    in_seconds = {
        "Request latency p50 / p90 / p99",
        "Queue wait p50 / p99",
        "Inference time per batch",
    }
    hide_zeros = {"Requests by endpoint and status", "Rejections by reason"}
    for axis, (title, targets) in zip(axes.flat, panel_targets().items(), strict=True):
        for target in targets:
            for series in prometheus.query_range(substitute(target["expr"]), start, end, 1.0):
                legend = target.get("legendFormat", "")
                for key, value in series["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                if title in hide_zeros and max(values, default=0) == 0:
                    continue  # the zero-initialised label sets: flat lines at 0
                axis.plot(times, values, label=legend.strip() or "value", linewidth=1.2)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds into the run", fontsize=8)
        if title in in_seconds:
            axis.set_ylabel("seconds", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7, loc="upper left")
        axis.grid(alpha=0.3)
    phases = ", ".join(f"{c} client(s) x {s} s" for s, c, _ in PHASES)
    figure.suptitle(f"resnet-serve dashboard panels, from Prometheus over a real run: {phases}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resnet-snapshot-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp) / "resnet18"
            print("exporting a random-init ResNet-18 ...", flush=True)
            command = [sys.executable, "-m", "model_export", "--random-init", "--quiet"]
            subprocess.run([*command, "--arch", "resnet18", "--out", str(model_dir)], check=True)
        server_args = ["--max-batch-size", "8", "--max-queue-size", "32"]
        log_path = Path(tmp) / "server.log"
        with (
            running_server(model_dir, args.precision, server_args, log_path) as (host, port, _),
            running_prometheus([f"{host}:{port}"], interval_s=1.0) as prometheus,
        ):
            prometheus.wait_until('up{job="resnet-serve"} == 1', timeout_s=15)
            start = time.time()
            statuses = asyncio.run(drive(f"http://{host}:{port}", images.small_jpegs()))
            time.sleep(3)  # the last scrapes
            end = time.time()
            print(f"statuses: {dict(sorted(statuses.items()))}")
            plot(prometheus, start, end, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
