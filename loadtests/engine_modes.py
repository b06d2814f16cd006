"""`python -m loadtests.engine_modes`: the engine alone (no HTTP, no decoding), batch after
batch of one size, under ways of running batches side by side: one caller; several callers
sharing one session; several callers each on a session of its own (instances). It answers
how concurrent batches should be run on a device (docs/benchmarks.md, "GPU").

With `--solo-threads N` (CPUs), the engine also gets the session for batches that run
alone, and three more modes compare it with the instances: one caller running alone; the
instances side by side; one caller alone beside one on an instance (what the batcher never
lets happen: the two fight for the cores).

    python -m loadtests.engine_modes --precision fp16 --batch-size 32
    python -m loadtests.engine_modes --precision int8 --batch-size 1 --providers \
        CPUExecutionProvider --intra-op-threads 1 --solo-threads 2 --spinning
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.engine.onnx_engine import EngineOptions, InferenceEngine, resolve_providers
from service.model_package import ModelPackage, Precision

# (name, sessions, whether each caller at once runs alone)
MODES = [
    ("1 session, 1 caller", 1, [False]),
    ("1 session, 2 callers", 1, [False, False]),
    ("2 sessions, 2 callers", 2, [False, False]),
]
SOLO_MODES = [  # with --solo-threads: 2 instances and the solo session
    ("alone, on the solo session", 2, [True]),
    ("2 instances side by side", 2, [False, False]),
    ("alone beside an instance", 2, [True, False]),
]


def throughput(
    engine: InferenceEngine, batch: np.ndarray, alone: list[bool], seconds: float
) -> dict[str, float]:
    for flag in (True, False, False):
        engine.run(batch, alone=flag)  # first runs of this shape (kernel search, allocation)
    stop = time.perf_counter() + seconds
    times: list[float] = []

    def loop(index: int) -> int:
        count = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            engine.run(batch, alone=alone[index])
            times.append(time.perf_counter() - started)
            count += len(batch)
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(len(alone)) as pool:
        images = sum(pool.map(loop, range(len(alone))))
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
    parser.add_argument("--solo-threads", type=int, default=0, help="CPUs: add the solo modes")
    args = parser.parse_args(argv)
    package = ModelPackage.load(args.model_dir)
    path = package.variant_path(Precision(args.precision))
    assert path is not None, f"no {args.precision} variant in {args.model_dir}"
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, 224, 224, 3), np.uint8)
    rows = []
    for name, sessions, alone in MODES + (SOLO_MODES if args.solo_threads else []):
        options = EngineOptions(
            providers=resolve_providers(args.providers.split(",")),
            instances=sessions,
            intra_op_threads=args.intra_op_threads,
            solo_threads=args.solo_threads if any(alone) else 0,
            allow_spinning=args.spinning,
        )
        engine = InferenceEngine(path, options)
        row = {
            "mode": name,
            "device": engine.device,
            **throughput(engine, batch, alone, args.seconds),
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
