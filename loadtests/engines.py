"""`python -m loadtests.engines`: ONNX Runtime against OpenVINO (`--runtime openvino`) on
the same package, in one run: fidelity, in-process throughput, and (with `--served`)
throughput through the real server.

- Fidelity: OpenVINO's outputs against ONNX Runtime's for the same variant (and, for
  INT8, against ONNX Runtime's FP32) on the export's sample photos, with the export's
  tolerances for that precision (model_export/verify.py).
- In-process: each runtime's engine opened as the server opens it (`load_engine`, the
  server's thread plan), batch after batch of random pixels, no decoding: batches that
  run alone (every CPU) and batches on the instances side by side (one caller each), at
  each `--batch-sizes`. Rounds alternate the runtimes' order; figures are medians.
- Served (`--served`): both servers started (`--runtime onnxruntime` and `--runtime
  openvino`, otherwise their defaults), closed-loop JPEG requests (loadtests/client.py)
  at each `--concurrency`, the best level per round, and lone requests; rounds
  alternate, medians reported.

    python -m loadtests.engines --model-dir models/resnet50 --precisions fp32,int8 --served
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import client, images
from loadtests.cli import machine
from loadtests.server import running_server
from model_export import photos, verify
from service.config import Settings
from service.engine.loading import Engine, load_engine
from service.model_package import ModelPackage, Precision

RUNTIMES = ("onnxruntime", "openvino")


def open_engine(model_dir: Path, runtime: str, precision: str, sizes: list[int]) -> Engine:
    """The engine as the server opens it (its settings, its thread plan), warmed up on
    every instance at `sizes`."""
    settings = Settings(model_dir=model_dir, runtime=runtime, precision=precision)
    engine, served, _ = load_engine(settings, ModelPackage.load(model_dir))
    assert str(served) == precision, f"{runtime} serves {served}, not {precision}"
    engine.warm_up(sizes)
    return engine


def rate(engine: Engine, batch: np.ndarray, callers: int, seconds: float) -> dict[str, float]:
    """Images/s of `callers` loops of `batch` (one loop: each batch runs alone)."""
    alone = callers == 1
    for _ in range(2):
        engine.run(batch, alone=alone)
    stop = time.perf_counter() + seconds
    times: list[float] = []

    def loop(_: int) -> int:
        count = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            engine.run(batch, alone=alone)
            times.append(time.perf_counter() - started)
            count += len(batch)
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        done = sum(pool.map(loop, range(callers)))
    return {
        "images_per_s": done / (time.perf_counter() - started),
        "batch_p50_ms": float(np.percentile(times, 50) * 1000),
    }


def fidelity(model_dir: Path, precision: str, engines: dict[str, Engine]) -> dict[str, Any]:
    """OpenVINO against ONNX Runtime on photos, with the export's tolerances."""
    spec = ModelPackage.load(model_dir).manifest.preprocessing
    pixels = photos.preprocess_files(photos.sample_photos(), spec)
    tolerances = verify.TOLERANCES[Precision(precision)]["photos"]
    references = {"onnxruntime": engines["onnxruntime"]}
    if precision != "fp32":
        references["onnxruntime fp32"] = open_engine(model_dir, "onnxruntime", "fp32", [8])
    found = {}
    for name, reference in references.items():
        check = verify.compare(
            verify.run_batched(engines["openvino"].run, pixels, 1),
            verify.run_batched(reference.run, pixels, 8),
            inputs="photos",
            batch_size=1,
            tolerances=tolerances,
        )
        found[f"openvino vs {name}"] = check.model_dump(exclude_none=True)
    return found


def in_process(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    engines = {
        runtime: open_engine(args.model_dir, runtime, precision, args.batch_sizes)
        for runtime in RUNTIMES
    }
    instances = Settings(model_dir=args.model_dir).thread_plan().instances
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = RUNTIMES if round_index % 2 == 0 else RUNTIMES[::-1]
        for runtime in order:
            for size in args.batch_sizes:
                batch = rng.integers(0, 256, (size, 224, 224, 3), np.uint8)
                for mode, callers in (("alone", 1), ("instances", instances)):
                    key = f"{runtime} b{size} {mode}"
                    figures = rate(engines[runtime], batch, callers, args.seconds)
                    samples.setdefault(key, []).append(figures["images_per_s"])
                    samples.setdefault(key + " p50_ms", []).append(figures["batch_p50_ms"])
    result = {key: statistics.median(values) for key, values in samples.items()}
    for key in [k for k in result if k.startswith("openvino") and not k.endswith("_ms")]:
        result[key.replace("openvino", "openvino/onnxruntime")] = (
            result[key] / result[key.replace("openvino", "onnxruntime")]
        )
    return {
        "instances": instances,
        "figures": result,
        "rounds": samples,
        "fidelity": fidelity(args.model_dir, precision, engines),
    }


async def served_round(
    hostports: dict[str, tuple[str, int]],
    args: argparse.Namespace,
    order: tuple[str, ...],
    samples: dict[str, list[float]],
) -> None:
    bodies = images.small_jpegs()
    for runtime in order:
        host, port = hostports[runtime]
        raw = [
            client.raw_request("/predict", body, "image/jpeg", f"{host}:{port}") for body in bodies
        ]
        best = 0.0
        for level in args.concurrency:
            load = await client.closed_loop(host, port, raw, level, args.duration, 1.0)
            if load.errors or set(load.statuses) != {200}:
                raise RuntimeError(f"{runtime}: errors {load.errors}, statuses {load.statuses}")
            samples.setdefault(f"{runtime} x{level}", []).append(load.images_per_s)
            best = max(best, load.images_per_s)
        samples.setdefault(f"{runtime} best", []).append(best)
        lone = await client.closed_loop(host, port, raw, 1, args.duration / 2, 0.5)
        samples.setdefault(f"{runtime} lone p50_ms", []).append(lone.percentile_ms(50))


def served(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    logs = args.out / "logs"
    with contextlib.ExitStack() as stack:
        hostports = {}
        for runtime in RUNTIMES:
            log = logs / f"engines-{runtime}-{precision}.log"
            flags = ["--runtime", runtime, *args.server_args.split()]
            host, port, _ = stack.enter_context(
                running_server(args.model_dir, precision, flags, log, timeout_s=300)
            )
            hostports[runtime] = (host, port)
        for round_index in range(args.rounds):
            order = RUNTIMES if round_index % 2 == 0 else RUNTIMES[::-1]
            asyncio.run(served_round(hostports, args, order, samples))
    result = {key: statistics.median(values) for key, values in samples.items()}
    result["openvino/onnxruntime best"] = result["openvino best"] / result["onnxruntime best"]
    return {"figures": result, "rounds": samples}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument(
        "--batch-sizes", type=lambda t: [int(p) for p in t.split(",")], default=[1, 8]
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="per in-process figure")
    parser.add_argument("--served", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--concurrency",
        type=lambda t: [int(p) for p in t.split(",")],
        default=[8],
        help="closed-loop levels (served)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per served level")
    parser.add_argument("--server-args", default="", help="more resnet-serve flags, for both")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": vars(args) | {"model_dir": str(args.model_dir), "out": str(args.out)},
        "runs": {},
    }
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        run: dict[str, Any] = {"in_process": in_process(args, precision)}
        print(json.dumps({precision: run["in_process"]["figures"]}, indent=1), flush=True)
        for name, check in run["in_process"]["fidelity"].items():
            print(
                f"{precision} {name}: passed {check['passed']}, logits min cosine "
                f"{check['logits_min_cosine']:.6f}, embedding min cosine "
                f"{check['embedding_min_cosine']:.6f}, top-1 {check['top1_agreement']:.2f} "
                f"({check['images']} photos)",
                flush=True,
            )
        if args.served:
            run["served"] = served(args, precision)
            print(json.dumps({precision: run["served"]["figures"]}, indent=1), flush=True)
        report["runs"][precision] = run
    report["wall_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engines-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"report: {path} ({report['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
