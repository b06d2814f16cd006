"""`python -m loadtests` (`make bench`): measure the service against its in-process ceiling.

For each precision: the ceiling (no HTTP), then a server of that package: lone-request
latency, closed-loop saturation over concurrency levels (raw JPEG bodies, then multipart),
open-loop Poisson load at fractions of saturation, and for INT8 12-megapixel photos. The
ratios the project targets are printed, written as JSON and plotted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtests import client, images
from loadtests.ceiling import InProcess
from loadtests.server import running_server
from service.config import Settings
from service.model_package import ModelPackage, Precision

# M/D/1 p99 response time in multiples of the service time S, at 50% and 80% load.
MD1_P99 = {0.5: 4.3, 0.8: 11.1}


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description="Benchmark resnet-serve: served throughput and latency against the "
        "in-process ceiling of the same work. Starts its own server on 127.0.0.1.",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models/resnet50"),
        help="package to serve; exported (random init, fp32 + int8) if missing "
        "(default: %(default)s)",
    )
    parser.add_argument("--precisions", default="fp32,int8", help="variants to measure, in order")
    parser.add_argument(
        "--url", help="measure an already running server instead of starting one (no ceiling)"
    )
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="closed-loop levels")
    parser.add_argument(
        "--loads", default="0.5,0.8", help="open-loop offered load, as fractions of saturation"
    )
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per closed-loop level")
    parser.add_argument(
        "--open-duration", type=float, default=15.0, help="seconds per open-loop load"
    )
    parser.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds per level")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved ceiling/served rounds per precision"
    )
    parser.add_argument(
        "--large", action=argparse.BooleanOptionalAction, default=True,
        help="also measure 12-megapixel JPEGs with the INT8 package",
    )  # fmt: skip
    parser.add_argument(
        "--server-args", default="", help="extra resnet-serve flags, e.g. '--max-batch-size 16'"
    )
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"), help="report folder")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    return parser


def ensure_package(model_dir: Path, precisions: list[str]) -> None:
    if (model_dir / "manifest.json").is_file():
        package = ModelPackage.load(model_dir)
        missing = [p for p in precisions if Precision(p) not in package.manifest.variants]
        if not missing:
            return
        raise SystemExit(f"{model_dir} lacks variants {missing}; re-export or pass --precisions")
    extra = [arg for p in precisions if p != "fp32" for arg in ("--precision", p)]
    print(f"exporting a random-init ResNet-50 package to {model_dir} ...", flush=True)
    command = [sys.executable, "-m", "model_export", "--random-init", "--quiet", "--out"]
    subprocess.run([*command, str(model_dir), *extra], check=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        vnni = False
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "vnni": vnni,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def measure_server(
    host: str,
    port: int,
    args: argparse.Namespace,
    small: list[bytes],
    large: list[bytes] | None,
    inproc: InProcess | None,
) -> dict[str, Any]:
    """Everything measured against one running server. With `inproc`, the ceiling is
    measured in rounds interleaved with the server's own figures, so each ratio compares
    two measurements taken seconds apart on this noisy, shared machine."""
    hostport = f"{host}:{port}"
    raw = [client.raw_request("/predict", body, "image/jpeg", hostport) for body in small]
    multipart = [client.multipart_request("/predict", [body], hostport) for body in small]
    results: dict[str, Any] = {}
    closed = []
    for concurrency in parse_floats(args.concurrency):
        result = await client.closed_loop(
            host, port, raw, int(concurrency), args.duration, args.warmup
        )
        closed.append(result)
        print(
            f"  closed loop x{int(concurrency)}: {result.images_per_s:.1f} img/s, "
            f"p50 {result.percentile_ms(50):.1f} ms, "
            f"client CPU {result.client_cpu_cores:.2f} cores",
            flush=True,
        )
    results["closed"] = [r.summary() for r in closed]
    best = max(closed, key=lambda r: r.images_per_s)
    concurrency = int(best.target)
    results["saturation_concurrency"] = concurrency
    rounds = []
    if inproc is not None:
        batch_size = inproc.best_batch_size(small, (1, 2, 4, 8, 16), 1.5)
        results["ceiling_batch_size"] = batch_size
        for index in range(args.rounds):
            ceiling = inproc.throughput(small, batch_size, args.duration / 2)
            served = await client.closed_loop(
                host, port, raw, concurrency, args.duration, args.warmup
            )
            single = inproc.single_image(small, 20)
            lone = await client.closed_loop(host, port, raw, 1, args.duration / 2, 0.5)
            rounds.append(
                {
                    "ceiling_images_per_s": ceiling,
                    "served_images_per_s": served.images_per_s,
                    "served_over_ceiling": served.images_per_s / ceiling,
                    **single,
                    "lone_p50_ms": lone.percentile_ms(50),
                    "lone_over_single": lone.percentile_ms(50) / single["single_image_ms"],
                }
            )
            print(
                f"  round {index + 1}: served {served.images_per_s:.1f} / ceiling "
                f"{ceiling:.1f} img/s = {served.images_per_s / ceiling:.3f}; lone p50 "
                f"{lone.percentile_ms(50):.1f} / single {single['single_image_ms']:.1f} ms "
                f"= {lone.percentile_ms(50) / single['single_image_ms']:.3f}",
                flush=True,
            )
        results["rounds"] = rounds
        results["served_over_ceiling"] = _median([r["served_over_ceiling"] for r in rounds])
        results["lone_over_single"] = _median([r["lone_over_single"] for r in rounds])
        results["saturation_images_per_s"] = _median(
            [best.images_per_s] + [r["served_images_per_s"] for r in rounds]
        )
        service_time = _median([r["lone_p50_ms"] for r in rounds])
    else:
        results["saturation_images_per_s"] = best.images_per_s
        lone = await client.closed_loop(host, port, raw, 1, args.duration, args.warmup)
        service_time = lone.percentile_ms(50)
    results["lone_p50_ms"] = service_time
    mp = await client.closed_loop(host, port, multipart, concurrency, args.duration, args.warmup)
    results["multipart"] = mp.summary()
    print(f"  multipart x{concurrency}: {mp.images_per_s:.1f} img/s", flush=True)
    opened = []
    rate_at_saturation = results["saturation_images_per_s"]
    for load in parse_floats(args.loads):
        rate = rate_at_saturation * load
        result = await client.open_loop(host, port, raw, rate, args.open_duration)
        summary = result.summary() | {"load": load}
        opened.append(summary)
        print(
            f"  open loop {load:.0%} ({rate:.1f} req/s): p50 {result.percentile_ms(50):.1f} "
            f"p90 {result.percentile_ms(90):.1f} p99 {result.percentile_ms(99):.1f} ms, "
            f"failed {result.failed}",
            flush=True,
        )
    results["open"] = opened
    if large:
        big = [client.raw_request("/predict", body, "image/jpeg", hostport) for body in large]
        small_again = await client.closed_loop(
            host, port, raw, concurrency, args.duration, args.warmup
        )
        result = await client.closed_loop(host, port, big, concurrency, args.duration, args.warmup)
        results["large"] = result.summary()
        results["large_over_small"] = result.images_per_s / small_again.images_per_s
        print(
            f"  12MP x{concurrency}: {result.images_per_s:.1f} img/s vs 0.2MP "
            f"{small_again.images_per_s:.1f} img/s",
            flush=True,
        )
    return results


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the performance issue with its measured figure."""
    rows = []
    runs = report["runs"]
    for precision, run in runs.items():
        served = run["server"]
        if "served_over_ceiling" in served:
            rows.append(
                {
                    "target": f"{precision}: served / in-process ceiling >= 0.95",
                    "value": served["served_over_ceiling"],
                }
            )
            rows.append(
                {
                    "target": f"{precision}: lone p50 / in-process single image <= 1.1",
                    "value": served["lone_over_single"],
                }
            )
        for row in served["open"]:
            bound = MD1_P99.get(row["load"])
            if bound:
                rows.append(
                    {
                        "target": f"{precision}: p99 at {row['load']:.0%} "
                        f"/ (1.2 x M/D/1 {bound} S) <= 1",
                        "value": row["p99_ms"] / (1.2 * bound * served["lone_p50_ms"]),
                        "failed": row["failed"],
                    }
                )
        if "large_over_small" in served:
            rows.append(
                {
                    "target": f"{precision}: 12MP / 0.2MP saturation >= 0.333",
                    "value": served["large_over_small"],
                }
            )
    if "fp32" in runs and "int8" in runs:
        rows.append(
            {
                "target": "int8 / fp32 served saturation >= 3",
                "value": runs["int8"]["server"]["saturation_images_per_s"]
                / runs["fp32"]["server"]["saturation_images_per_s"],
            }
        )
    return rows  # fmt: skip


def print_table(report: dict[str, Any]) -> None:
    print(
        "\n=== resnet-serve benchmark:",
        report["machine"]["cpu"],
        f"({report['machine']['cores']} cores)",
    )
    for precision, run in report["runs"].items():
        served = run["server"]
        print(f"\n[{precision}]")
        for row in served.get("rounds", []):
            print(
                f"  round: ceiling {row['ceiling_images_per_s']:.1f} img/s (batch "
                f"{served['ceiling_batch_size']}), served {row['served_images_per_s']:.1f}; "
                f"one image in-process {row['single_image_ms']:.1f} ms (decode "
                f"{row['decode_ms']:.1f} + infer {row['infer_batch1_ms']:.1f}), "
                f"lone request p50 {row['lone_p50_ms']:.1f} ms"
            )
        print(
            f"  served saturation: {served['saturation_images_per_s']:.1f} img/s "
            f"(x{served['saturation_concurrency']}), "
            f"multipart {served['multipart']['images_per_s']:.1f}"
        )
        print("  concurrency  img/s    p50 ms   p99 ms  client cores")
        for row in served["closed"]:
            print(
                f"  {int(row['target']):>11}  {row['images_per_s']:6.1f}  {row['p50_ms']:7.1f}  "
                f"{row['p99_ms']:7.1f}  {row['client_cpu_cores']:.2f}"
            )
        print("  load  offered/s  p50 ms  p90 ms  p99 ms  failed")
        for row in served["open"]:
            print(
                f"  {row['load']:4.0%}  {row['target']:9.1f}  {row['p50_ms']:6.1f}  "
                f"{row['p90_ms']:6.1f}  {row['p99_ms']:6.1f}  {row['failed']}"
            )
    print("\n  target                                                      measured")
    for row in report["ratios"]:
        print(f"  {row['target']:<60}{row['value']:.3f}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for precision, run in report["runs"].items():
        served = run["server"]
        closed = served["closed"]
        right.plot(
            [r["target"] for r in closed],
            [r["images_per_s"] for r in closed],
            "o-",
            label=precision,
        )
        if served.get("rounds"):
            ceiling = _median([r["ceiling_images_per_s"] for r in served["rounds"]])
            right.axhline(ceiling, linestyle="--", linewidth=1)
        loads = [r["target"] for r in served["open"]]
        for q, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            left.plot(loads, [r[q] for r in served["open"]], style, label=f"{precision} {q[:3]}")
    left.set_xlabel("offered load (requests/s, Poisson)")
    left.set_ylabel("latency (ms, from scheduled send)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.set_title("latency percentiles vs offered load")
    right.set_xlabel("concurrent clients (closed loop)")
    right.set_ylabel("images/s")
    right.set_xscale("log", base=2)
    right.legend(fontsize=8)
    right.set_title("throughput vs concurrency (dashed: in-process ceiling)")
    figure.suptitle(
        f"resnet-serve on {report['machine']['cpu']} ({report['machine']['cores']} cores)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    small = images.small_jpegs()
    large = images.large_jpegs() if args.large else None
    report: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": vars(args) | {"model_dir": str(args.model_dir), "out": str(args.out)},
        "workload": {
            "small_jpeg_bytes": [len(b) for b in small],
            "large_jpeg_bytes": [len(b) for b in large or []],
        },
        "runs": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.url:
        url = httpx.URL(args.url)
        print(f"[{args.url}]", flush=True)
        served = asyncio.run(measure_server(url.host, url.port or 80, args, small, None, None))
        report["runs"]["server"] = {"server": served}
    else:
        ensure_package(args.model_dir, precisions)
        server_args = args.server_args.split()
        settings = Settings(**_settings_overrides(server_args))
        for precision in precisions:
            print(f"[{precision}]", flush=True)
            inproc = InProcess(args.model_dir, Precision(precision), settings)
            log = args.out / f"server-{precision}.log"
            try:
                with running_server(args.model_dir, precision, server_args, log) as (host, port, _):
                    with_large = large if precision == "int8" else None
                    served = asyncio.run(
                        measure_server(host, port, args, small, with_large, inproc)
                    )
            finally:
                inproc.close()
            report["runs"][precision] = {"server": served}
    report["ratios"] = ratios(report)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nreport: {json_path}")
    if args.plot:
        png = args.out / f"bench-{stamp}.png"
        plot(report, png)
        print(f"plot: {png}")
    return 0


def _settings_overrides(server_args: list[str]) -> dict[str, Any]:
    """The server flags that change the ceiling's thread settings, as Settings fields."""
    from service.cli import build_parser as server_parser

    return vars(server_parser().parse_args(server_args))
