"""`python -m loadtests` (`make bench`): measure the service against a naive server and
against its in-process ceiling.

For each precision, `resnet-serve` and the naive baseline (loadtests/naive.py) run side by
side on the same package. The headline (loadtests/openloop.py): each one's saturation, then
open-loop Poisson load at 50/80/95% of the naive server's saturation, in rounds with the
servers' order alternated, every figure a ratio to the naive server's. Then, against the
in-process ceiling of the same work (no HTTP): served/ceiling throughput and lone-request
latency in interleaved rounds, multipart bodies, and for INT8 12-megapixel photos. The
ratios the project targets are printed, written as JSON and plotted. `--quick` runs a
shorter version for iterating.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import client, images, openloop
from loadtests.ceiling import InProcess
from loadtests.report import NAIVE, SERVICE, median, plot, print_table, ratios
from loadtests.server import running_naive, running_server
from service.config import Settings
from service.model_package import ModelPackage, Precision


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
    parser.add_argument("--concurrency", default="4,8,16", help="closed-loop levels")
    parser.add_argument(
        "--loads",
        default="0.5,0.8,0.95",
        help="open-loop offered load, as fractions of the naive server's saturation",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop level")
    parser.add_argument(
        "--open-rounds", type=int, default=2, help="open-loop rounds (servers' order alternated)"
    )
    parser.add_argument(
        "--requests-per-point",
        default="fp32=500,int8=1000,fp16=500",
        help="open-loop requests per server, load and round, by precision",
    )
    parser.add_argument(
        "--max-point-s", type=float, default=50.0, help="seconds per open-loop point, at most"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME[@CHECKOUT]=FLAGS",
        help="another resnet-serve configuration for the open-loop comparison, e.g. "
        "'delay0=--max-queue-delay-ms 0', or an older checkout's defaults "
        "'before@/path/to/checkout='; repeatable",
    )
    parser.add_argument(
        "--naive", action=argparse.BooleanOptionalAction, default=True,
        help="run the naive baseline and the open-loop comparison",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a shorter run for iterating: INT8 only, one open-loop round of 300 requests a "
        "point, one ceiling round, no 12-megapixel photos (unless set otherwise)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved ceiling/served rounds per precision"
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
    concurrency: int | None,
) -> dict[str, Any]:
    """The server against its in-process ceiling, at its saturation `concurrency` (found by
    the open-loop comparison, else here). With `inproc`, the ceiling is measured in rounds
    interleaved with the server's own figures, so each ratio compares two measurements
    taken seconds apart on this noisy, shared machine."""
    hostport = f"{host}:{port}"
    raw = [client.raw_request("/predict", body, "image/jpeg", hostport) for body in small]
    multipart = [client.multipart_request("/predict", [body], hostport) for body in small]
    results: dict[str, Any] = {}
    if concurrency is None:
        closed = []
        for level in parse_floats(args.concurrency):
            result = await client.closed_loop(
                host, port, raw, int(level), args.duration, args.warmup
            )
            closed.append(result)
            print(f"  closed loop x{int(level)}: {result.images_per_s:.1f} img/s", flush=True)
        results["closed"] = [r.summary() for r in closed]
        best = max(closed, key=lambda r: r.images_per_s)
        concurrency = int(best.target)
        results["saturation_images_per_s"] = best.images_per_s
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
        results["served_over_ceiling"] = median([r["served_over_ceiling"] for r in rounds])
        results["lone_over_single"] = median([r["lone_over_single"] for r in rounds])
        results["served_images_per_s"] = median([r["served_images_per_s"] for r in rounds])
        results["lone_p50_ms"] = median([r["lone_p50_ms"] for r in rounds])
    mp = await client.closed_loop(host, port, multipart, concurrency, args.duration, args.warmup)
    results["multipart"] = mp.summary()
    print(f"  multipart x{concurrency}: {mp.images_per_s:.1f} img/s", flush=True)
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


def apply_quick(args: argparse.Namespace, given: set[str]) -> None:
    """`--quick`: shorter defaults, each kept where the command line set it."""
    quick = {
        "precisions": "int8",
        "open_rounds": 1,
        "requests_per_point": "fp32=300,int8=300,fp16=300",
        "rounds": 1,
        "large": False,
        "duration": 4.0,
        "plot": False,
    }
    for name, value in quick.items():
        if name not in given:
            setattr(args, name, value)


def parse_also(texts: list[str]) -> list[tuple[str, Path | None, list[str]]]:
    """`NAME[@CHECKOUT]=FLAGS` → (name, checkout, flags)."""
    configurations = []
    for text in texts:
        head, _, flags = text.partition("=")
        name, _, checkout = head.partition("@")
        configurations.append((name, Path(checkout) if checkout else None, flags.split()))
    return configurations


def by_precision(text: str) -> dict[str, int]:
    pairs = (part.split("=") for part in text.split(",") if part.strip())
    return {key.strip(): int(value) for key, value in pairs}


def measure_precision(
    args: argparse.Namespace,
    precision: str,
    server_args: list[str],
    settings: Settings,
    small: list[bytes],
    large: list[bytes] | None,
) -> dict[str, Any]:
    """Everything for one variant: the open-loop comparison, then the ceiling rounds."""
    run: dict[str, Any] = {}
    inproc = InProcess(args.model_dir, Precision(precision), settings)
    log = args.out / "logs" / f"{SERVICE}-{precision}.log"
    try:
        with running_server(args.model_dir, precision, server_args, log) as (host, port, _):
            concurrency = None
            if args.naive:
                run["open_loop"] = compare_open_loop(args, precision, (host, port), small)
                concurrency = int(run["open_loop"]["saturation"][SERVICE]["concurrency"])
            with_large = large if precision == "int8" else None
            run["server"] = asyncio.run(
                measure_server(host, port, args, small, with_large, inproc, concurrency)
            )
    finally:
        inproc.close()
    return run


def compare_open_loop(
    args: argparse.Namespace, precision: str, service: tuple[str, int], small: list[bytes]
) -> dict[str, Any]:
    """The headline: the running service, the naive baseline and any `--also`
    configurations under the same open-loop load; all but the service stop afterwards."""
    log_dir = args.out / "logs"
    targets = [openloop.Target(SERVICE, *service)]
    with contextlib.ExitStack() as stack:
        host, port, _ = stack.enter_context(
            running_naive(args.model_dir, precision, log_dir / f"{NAIVE}-{precision}.log")
        )
        targets.append(openloop.Target(NAIVE, host, port))
        for name, checkout, flags in parse_also(args.also):
            log = log_dir / f"{name}-{precision}.log"
            server = running_server(args.model_dir, precision, flags, log, cwd=checkout)
            host, port, _ = stack.enter_context(server)
            targets.append(openloop.Target(name, host, port))
        plan = openloop.Plan(
            loads=parse_floats(args.loads),
            rounds=args.open_rounds,
            requests_per_point=by_precision(args.requests_per_point).get(precision, 500),
            max_point_s=args.max_point_s,
            concurrency=[int(c) for c in parse_floats(args.concurrency)],
            closed_s=args.duration,
            warmup_s=args.warmup,
        )
        return asyncio.run(openloop.compare(targets, NAIVE, small, plan))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        given = {
            action.dest
            for action in parser._actions
            if any(
                option in (argv if argv is not None else sys.argv[1:])
                for option in action.option_strings
            )
        }
        apply_quick(args, given)
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
    started = time.monotonic()
    if args.url:
        url = httpx.URL(args.url)
        print(f"[{args.url}]", flush=True)
        served = asyncio.run(
            measure_server(url.host, url.port or 80, args, small, None, None, None)
        )
        report["runs"]["server"] = {"server": served}
    else:
        ensure_package(args.model_dir, precisions)
        server_args = args.server_args.split()
        settings = settings_from_flags(server_args)
        for precision in precisions:
            print(f"[{precision}]", flush=True)
            report["runs"][precision] = measure_precision(
                args, precision, server_args, settings, small, large
            )
    report["ratios"] = ratios(report)
    report["wall_s"] = round(time.monotonic() - started, 1)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nreport: {json_path} ({report['wall_s'] / 60:.1f} min)")
    if args.plot:
        png = args.out / f"bench-{stamp}.png"
        plot(report, png)
        print(f"plot: {png}")
    return 0


def settings_from_flags(server_args: list[str]) -> Settings:
    """The settings a server started with these flags has (for the ceiling's threads)."""
    from service.cli import build_parser as server_parser

    return Settings(**vars(server_parser().parse_args(server_args)))
