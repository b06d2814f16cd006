"""`python -m loadtests.gpu`: the benchmark on a GPU (docs/benchmarks.md, "GPU").

For each precision and max batch size, one server (`--providers auto`, so CUDA) and, in this
process, the in-process ceiling of the same work (decode on the server's decode pool, then
the engine, two loops at once as the server runs two batches):

- saturation: closed-loop levels, the best one kept; while it runs, the GPU's utilisation
  (NVML, sampled every 100 ms), the server's CPU use (all threads, and its event-loop
  thread alone), and where each image's time went (the server's own stage histograms);
- lone-request latency against the in-process single-image time;
- open-loop p50/p99 at fractions of that saturation (Poisson arrivals).

    python -m loadtests.gpu --precisions fp32,fp16 --batch-sizes 8,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests import client, images
from loadtests.ceiling import InProcess
from loadtests.cli import ensure_package, machine, parse_floats, settings_from_flags
from loadtests.server import running_server
from service.model_package import Precision

STAGES = {
    "decode_ms": "resnet_decode_duration_seconds",
    "queue_wait_ms": "resnet_queue_wait_seconds",
    "inference_ms": "resnet_inference_duration_seconds",  # per batch
    "request_ms": "resnet_request_duration_seconds",
}


def _sums(url: str) -> dict[str, float]:
    """`name_sum` and `name_count` of every histogram, summed over label sets."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per observation of each stage, and the mean batch size, between two scrapes."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    means = {
        key: 1000 * delta(f"{name}_sum") / count
        for key, name in STAGES.items()
        if (count := delta(f"{name}_count")) > 0
    }
    if (batches := delta("resnet_batch_size_count")) > 0:
        means["mean_batch_size"] = delta("resnet_batch_size_sum") / batches
    return means


def _thread_cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process (all threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GpuSampler:
    """The GPU's utilisation (NVML's percent of time a kernel ran), every `period_s`."""

    def __init__(self, index: int = 0, period_s: float = 0.1) -> None:
        self._period_s = period_s
        self._handle: Any = None
        self.name = "none (NVML unavailable)"
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # no library, no driver, no GPU: utilisation is not measured
            print(f"no GPU utilisation: {exc!r}", flush=True)
            return
        self._nvml = pynvml
        self.name = str(pynvml.nvmlDeviceGetName(self._handle))

    @contextmanager
    def sampling(self) -> Iterator[list[float]]:
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while self._handle is not None and not stop.wait(self._period_s):
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                samples.append(float(rates.gpu))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()


async def saturation(
    host: str, port: int, pid: int, args: argparse.Namespace, raw: list[bytes], gpu: GpuSampler
) -> dict[str, Any]:
    url = f"http://{host}:{port}"
    levels = []
    for level in parse_floats(args.concurrency):
        before, cpu_before, loop_before = _sums(url), _thread_cpu_s(pid), _thread_cpu_s(pid, pid)
        with gpu.sampling() as utilisation:
            result = await client.closed_loop(host, port, raw, int(level), args.duration, 0.0)
        # The window includes no warm-up (set apart above), so CPU and stage figures match it.
        row: dict[str, Any] = {
            **result.summary(),
            "gpu_util_mean_pct": sum(utilisation) / len(utilisation) if utilisation else None,
            "server_cpu_cores": (_thread_cpu_s(pid) - cpu_before) / result.duration_s,
            "event_loop_busy": (_thread_cpu_s(pid, pid) - loop_before) / result.duration_s,
            **stage_means(before, _sums(url)),
        }
        levels.append(row)
        print(
            f"    x{int(level)}: {row['images_per_s']:.0f} img/s, "
            f"GPU {row['gpu_util_mean_pct'] or 0:.0f}%"
            f", server {row['server_cpu_cores']:.1f} cores (event loop "
            f"{row['event_loop_busy']:.0%}), client {row['client_cpu_cores']:.2f} cores, "
            f"batch {row.get('mean_batch_size', 0):.1f}",
            flush=True,
        )
    return max(levels, key=lambda row: float(row["images_per_s"])) | {"levels": levels}


def measure(
    args: argparse.Namespace, precision: str, batch_size: int, gpu: GpuSampler, small: list[bytes]
) -> dict[str, Any]:
    flags = [
        "--max-batch-size", str(batch_size),
        "--max-queue-size", str(args.max_queue_size),
        *args.server_args.split(),
    ]  # fmt: skip
    log = args.out / "logs" / f"gpu-{precision}-b{batch_size}.log"
    started = time.monotonic()
    with running_server(args.model_dir, precision, flags, log, timeout_s=600) as (host, port, pid):
        ready_s = time.monotonic() - started
        info = httpx.get(f"http://{host}:{port}/info", timeout=10).json()
        hostport = f"{host}:{port}"
        raw = [client.raw_request("/predict", body, "image/jpeg", hostport) for body in small]
        asyncio.run(client.closed_loop(host, port, raw, 32, args.warmup, 0.0))  # warm-up
        best = asyncio.run(saturation(host, port, pid, args, raw, gpu))
        lone = asyncio.run(client.closed_loop(host, port, raw, 1, args.duration / 2, 0.5))
        rate = best["requests_per_s"]
        loads = {
            f"{load:g}": asyncio.run(
                client.open_loop(host, port, raw, load * rate, args.open_s)
            ).summary()
            for load in parse_floats(args.loads)
        }
    settings = settings_from_flags(flags)
    inproc = InProcess(args.model_dir, Precision(precision), settings)
    try:
        inproc.throughput(small, batch_size, 1.0)  # first runs of this shape
        ceiling = inproc.throughput(small, batch_size, args.duration)
        single = inproc.single_image(small, 30)
    finally:
        inproc.close()
    row = {
        "precision": precision,
        "max_batch_size": batch_size,
        "served_precision": info["serving"]["precision"],
        "providers": info["serving"]["execution_providers"],
        "threads": info["threads"],
        "start_to_ready_s": round(ready_s, 1),
        "saturation": best,
        "ceiling_images_per_s": ceiling,
        "served_over_ceiling": best["images_per_s"] / ceiling,
        "lone_p50_ms": lone.percentile_ms(50),
        **single,
        "lone_over_single": lone.percentile_ms(50) / single["single_image_ms"],
        "open_loop": loads,
    }
    print(
        f"  {precision} b{batch_size}: served {best['images_per_s']:.0f} / ceiling {ceiling:.0f} "
        f"img/s = {row['served_over_ceiling']:.2f}, GPU {best['gpu_util_mean_pct'] or 0:.0f}%; "
        f"lone "
        f"{row['lone_p50_ms']:.1f} ms / single {single['single_image_ms']:.1f} ms; open loop "
        + ", ".join(
            f"{load}: p50 {r['p50_ms']:.0f} p99 {r['p99_ms']:.0f} ms" for load, r in loads.items()
        ),
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--batch-sizes", default="8,32,64", help="--max-batch-size values")
    parser.add_argument("--concurrency", default="64,128,256", help="closed-loop levels")
    parser.add_argument("--loads", default="0.5,0.8", help="open-loop load, of saturation")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--open-s", type=float, default=5.0, help="seconds per open-loop point")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load first")
    parser.add_argument("--max-queue-size", type=int, default=1024)
    parser.add_argument("--server-args", default="", help="extra resnet-serve flags")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    ensure_package(args.model_dir, precisions)
    gpu = GpuSampler()
    small = images.small_jpegs()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    report: dict[str, Any] = {"machine": machine() | {"gpu": gpu.name}, "settings": vars(args) | {
        "model_dir": str(args.model_dir), "out": str(args.out)}, "rows": []}  # fmt: skip
    for precision in precisions:
        for size in parse_floats(args.batch_sizes):
            report["rows"].append(measure(args, precision, int(size), gpu, small))
            path.write_text(json.dumps(report, indent=2))  # a cut-off run keeps what it has
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
