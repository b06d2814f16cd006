"""`python -m loadtests.engine_modes`: the engine alone (no HTTP, no decoding), batch after
batch of one size, under ways of running batches side by side: one caller; several callers
sharing one session; several callers each on a session of its own (instances). It answers
how concurrent batches should be run on a device (docs/benchmarks.md, "GPU").

    python -m loadtests.engine_modes --precision fp16 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.engine import EngineOptions, InferenceEngine, resolve_providers
from service.model_package import ModelPackage, Precision

# (name, sessions, callers at once)
MODES = [
    ("1 session, 1 caller", 1, 1),
    ("1 session, 2 callers", 1, 2),
    ("2 sessions, 2 callers", 2, 2),
]


def throughput(
    engine: InferenceEngine, batch: np.ndarray, callers: int, seconds: float
) -> dict[str, float]:
    for _ in range(3):
        engine.run(batch)  # first runs of this shape (kernel search, allocation)
    stop = time.perf_counter() + seconds
    times: list[float] = []

    def loop(_: int) -> int:
        count = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - started)
            count += len(batch)
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        images = sum(pool.map(loop, range(callers)))
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": images / elapsed,
        "batch_p50_ms": float(np.percentile(times, 50) * 1000),
        "batch_p99_ms": float(np.percentile(times, 99) * 1000),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.engine_modes", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--providers", default="auto")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    args = parser.parse_args(argv)
    package = ModelPackage.load(args.model_dir)
    path = package.variant_path(Precision(args.precision))
    assert path is not None, f"no {args.precision} variant in {args.model_dir}"
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, 224, 224, 3), np.uint8)
    rows = []
    for name, sessions, callers in MODES:
        options = EngineOptions(
            providers=resolve_providers(args.providers.split(",")),
            instances=sessions,
            intra_op_threads=args.intra_op_threads,
            allow_spinning=args.spinning,
        )
        engine = InferenceEngine(path, options)
        row = {
            "mode": name,
            "device": engine.device,
            **throughput(engine, batch, callers, args.seconds),
        }
        rows.append(row)
        print(
            f"{args.precision} b{args.batch_size} {name}: {row['images_per_s']:.0f} img/s, batch "
            f"p50 {row['batch_p50_ms']:.1f} ms, p99 {row['batch_p99_ms']:.1f} ms ({engine.device})",
            flush=True,
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
