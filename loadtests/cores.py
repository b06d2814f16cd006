"""`python -m loadtests.cores`: served throughput against the in-process ceiling on 1, 2, ...
cores, with the server (and, in its own process, the ceiling) pinned by `taskset`.

The service sizes its thread plan from its affinity mask, so each core count gets the plan
it would get in a pod with that CPU limit. The load generator is not pinned: on a machine
with no spare cores it competes with the server, which the ceiling (measured without HTTP
and without a client) does not, so served/ceiling is the fair figure, and served per core
at the largest count is the pessimistic one.

    python -m loadtests.cores --cores 1,2 --precision int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtests import client, images
from loadtests.cli import ensure_package, machine, parse_floats
from loadtests.server import running_server


def cpu_list(count: int) -> str:
    available = sorted(os.sched_getaffinity(0))
    if count > len(available):
        raise SystemExit(f"only {len(available)} CPUs are available, not {count}")
    return ",".join(str(cpu) for cpu in available[:count])


def ceiling(args: argparse.Namespace, cpus: str) -> dict[str, Any]:
    command = [
        "taskset", "-c", cpus, sys.executable, "-m", "loadtests.ceiling",
        "--model-dir", str(args.model_dir), "--precision", args.precision,
        "--seconds", str(args.duration), "--server-args", args.server_args,
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


async def saturation(host: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    hostport = f"{host}:{port}"
    raw = [client.raw_request("/predict", b, "image/jpeg", hostport) for b in images.small_jpegs()]
    levels = [
        await client.closed_loop(host, port, raw, int(level), args.duration, args.warmup)
        for level in parse_floats(args.concurrency)
    ]
    best = max(levels, key=lambda result: result.images_per_s)
    return {"images_per_s": best.images_per_s, "concurrency": int(best.target)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cores", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--cores", default="1,2", help="core counts to pin the server to")
    parser.add_argument("--concurrency", default="4,8,16", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the core counts")
    parser.add_argument("--server-args", default="", help="extra resnet-serve flags")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = parser.parse_args(argv)
    ensure_package(args.model_dir, [args.precision])
    counts = [int(count) for count in parse_floats(args.cores)]
    rows: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for count in counts if round_index % 2 == 0 else counts[::-1]:
            cpus = cpu_list(count)
            limit = ceiling(args, cpus)
            log = args.out / "logs" / f"cores-{count}.log"
            prefix = ["taskset", "-c", cpus]
            with running_server(
                args.model_dir, args.precision, args.server_args.split(), log, prefix=prefix
            ) as (host, port, _):
                served = asyncio.run(saturation(host, port, args))
            row = {
                "round": round_index,
                "cores": count,
                "served_images_per_s": served["images_per_s"],
                "concurrency": served["concurrency"],
                "ceiling_images_per_s": limit["images_per_s"],
                "served_over_ceiling": served["images_per_s"] / limit["images_per_s"],
                "served_per_core": served["images_per_s"] / count,
                "single_image_ms": limit["single_image_ms"],
                "threads": limit["threads"],
            }
            rows.append(row)
            print(
                f"  {count} core(s): served {row['served_images_per_s']:.1f} img/s "
                f"(x{row['concurrency']}), ceiling {row['ceiling_images_per_s']:.1f}, "
                f"served/ceiling {row['served_over_ceiling']:.3f}, "
                f"per core {row['served_per_core']:.1f}",
                flush=True,
            )
    report = {"machine": machine(), "settings": vars(args) | {"model_dir": str(args.model_dir),
              "out": str(args.out)}, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cores-{args.precision}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
