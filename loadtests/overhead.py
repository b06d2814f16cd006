"""`python -m loadtests.overhead`: the server's own cost per request, on the cheap-engine
package (loadtests/cheap_package.py: a graph that costs microseconds), as Triton measures
its overhead with identity models.

Each configuration serves the same package and is driven to saturation by `wrk` (C, one
thread: it takes far less of the shared cores than any Python client) with photo JPEG
bodies; reported: served requests per second, and the CPU milliseconds per request of the
whole server (every process of its tree, from /proc), each set against the naive server's
(loadtests/naive.py) measured in the same run. Rounds alternate the order of the servers.

    python -m loadtests.overhead --configs naive,workers=0,workers=1,workers=2,auto \\
        --also before@/path/to/older/checkout=
    python -m loadtests.overhead --package models/resnet50 --precision int8 \\
        --configs naive,auto   # the same figures where the engine dominates
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests import images
from loadtests.cheap_package import write_cheap_package
from loadtests.client import machine_times
from loadtests.server import running_naive, running_server

WRK_SCRIPT = """
local bodies = {}
local index = 0
for line in io.lines("%(list)s") do
  local file = io.open(line, "rb")
  bodies[#bodies + 1] = file:read("*a")
  file:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
request = function()
  index = index %% #bodies + 1
  return wrk.format(nil, "%(path)s", nil, bodies[index])
end
"""


@dataclass
class Point:
    config: str
    round: int
    requests_per_s: float
    cpu_ms_per_request: float
    server_cores: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    load_generator_cores: float = 0.0  # wrk
    other_cores: float = 0.0  # busy CPU that was neither the server nor wrk: noise


@dataclass
class Report:
    cpu: str
    cores: int
    connections: int
    duration_s: float
    points: list[Point] = field(default_factory=list)

    def medians(self) -> dict[str, dict[str, float]]:
        by_config: dict[str, list[Point]] = {}
        for point in self.points:
            by_config.setdefault(point.config, []).append(point)
        return {
            config: {
                "requests_per_s": _median([p.requests_per_s for p in points]),
                "cpu_ms_per_request": _median([p.cpu_ms_per_request for p in points]),
                "server_cores": _median([p.server_cores for p in points]),
            }
            for config, points in by_config.items()
        }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and all its descendants (their own, not reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(member, 0.0) for member in tree)


def _latency_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\b", text, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, script: Path, connections: int, duration_s: float) -> dict[str, float]:
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s:g}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + 60,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests": requests,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "errors": sum(int(group) for group in errors.groups()) if errors else 0,
        "p50_ms": _latency_ms(output, "50"),
        "p99_ms": _latency_ms(output, "99"),
    }


def measure(
    config: str, round_index: int, pid: int, url: str, script: Path, args: argparse.Namespace
) -> Point:
    run_wrk(url, script, args.connections, args.warmup)  # warm-up: caches, pools, batch sizes
    cpu_before, started = tree_cpu_seconds(pid), time.perf_counter()
    machine_before, wrk_before = machine_times(), _children_cpu_seconds()
    result = run_wrk(url, script, args.connections, args.duration)
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(pid) - cpu_before
    wrk_cpu = _children_cpu_seconds() - wrk_before
    machine_after = machine_times()
    busy = (
        (machine_after - machine_before).busy_s
        if machine_after is not None and machine_before is not None
        else cpu + wrk_cpu
    )
    ok = result["requests"] - result["non_2xx"]
    return Point(
        config,
        round_index,
        requests_per_s=round(ok / args.duration, 1),
        cpu_ms_per_request=round(cpu * 1000 / max(ok, 1), 3),
        server_cores=round(cpu / elapsed, 3),
        non_2xx=int(result["non_2xx"]),
        errors=int(result["errors"]),
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        load_generator_cores=round(wrk_cpu / elapsed, 3),
        other_cores=round(max(0.0, busy - cpu - wrk_cpu) / elapsed, 3),
    )


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def server_for(
    config: str, package: Path, precision: str, logs: Path, extra: list[str]
) -> AbstractContextManager[tuple[str, int, int]]:
    """`naive`; `auto` (the defaults); `workers=N`; `NAME@CHECKOUT=FLAGS` (an older checkout)."""
    log_path = logs / f"{re.sub(r'[^A-Za-z0-9=_-]', '_', config)}.log"
    if config == "naive":
        return running_naive(package, precision, log_path)
    if "@" in config:
        _name, _, rest = config.partition("@")
        checkout, _, flags = rest.partition("=")
        return running_server(
            package, precision, flags.split() + extra, log_path, cwd=Path(checkout)
        )
    if config == "auto":
        return running_server(package, precision, extra, log_path)
    if config.startswith("workers="):
        return running_server(package, precision, ["--workers", config[8:], *extra], log_path)
    raise SystemExit(f"unknown configuration {config!r}")


@contextmanager
def wrk_script(path: str) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="overhead-"))
    try:
        listing = directory / "bodies.txt"
        names = []
        for index, body in enumerate(images.small_jpegs()):
            name = directory / f"{index}.jpg"
            name.write_bytes(body)
            names.append(str(name))
        listing.write_text("\n".join(names) + "\n")
        script = directory / "photos.lua"
        script.write_text(WRK_SCRIPT % {"list": listing, "path": path})
        yield script
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overhead", description=__doc__)
    parser.add_argument(
        "--package",
        type=Path,
        default=Path("models/cheap"),
        help="package to serve (written if missing: the cheap-engine package); a ResNet-50 "
        "package measures the same figures where the engine dominates",
    )
    parser.add_argument("--precision", default="fp32", help="variant to serve")
    parser.add_argument(
        "--configs",
        default="naive,workers=0,workers=1,workers=2,auto",
        help="servers to compare: naive, auto (resnet-serve's defaults), workers=N",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME@CHECKOUT=FLAGS",
        help="resnet-serve from another checkout (e.g. today's: 'before@/tmp/old='); repeatable",
    )
    parser.add_argument("--server-args", default="", help="extra flags for every resnet-serve")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the order reversed each")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/overhead.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: install Debian's wrk package (scripts/install-wrk.sh)")
    if not (args.package / "manifest.json").is_file():
        write_cheap_package(args.package)
    configs = [c for c in args.configs.split(",") if c] + list(args.also)
    report = Report(_cpu_model(), os.cpu_count() or 0, args.connections, args.duration)
    logs = args.out.parent / "overhead-logs"
    extra = args.server_args.split()
    with wrk_script("/predict") as script:
        for round_index in range(args.rounds):
            order = configs if round_index % 2 == 0 else list(reversed(configs))
            for config in order:
                with server_for(config, args.package, args.precision, logs, extra) as (
                    host,
                    port,
                    pid,
                ):
                    point = measure(config, round_index, pid, f"http://{host}:{port}", script, args)
                report.points.append(point)
                print(json.dumps(asdict(point)), flush=True)
    print_summary(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**asdict(report), "medians": report.medians()}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


def print_summary(report: Report) -> None:
    medians = report.medians()
    naive = medians.get("naive")
    print(f"\n{report.cpu}, {report.cores} CPUs, wrk -c{report.connections}, medians:")
    print(f"{'server':28s} {'req/s':>8s} {'x naive':>8s} {'CPU ms/req':>11s} {'x naive':>8s}")
    for config, figures in medians.items():
        rate, cost = figures["requests_per_s"], figures["cpu_ms_per_request"]
        rate_ratio = rate / naive["requests_per_s"] if naive else float("nan")
        cost_ratio = cost / naive["cpu_ms_per_request"] if naive else float("nan")
        print(f"{config:28s} {rate:8.1f} {rate_ratio:8.2f} {cost:11.2f} {cost_ratio:8.2f}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
