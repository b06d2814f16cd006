"""The ceiling: the same work in-process with no HTTP, using the service's own pieces
(`ImagePreprocessor`, the engine on the settings' runtime) with the server's thread
settings.

Per image the work is decode + resize + crop, then the runtime. The throughput ceiling
decodes a batch on a pool of `decode_workers` threads, then runs it, batch after batch,
and is the best of one loop whose batches run alone (on every CPU) and as many loops at
once as the server runs batches (each on its own engine instance, as in the server); the
single-image time does one image at a time, alone.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.config import Settings
from service.engine.loading import load_engine
from service.engine.policy import device_policy
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage, Precision


class InProcess:
    def __init__(self, model_dir: Path, precision: Precision, settings: Settings) -> None:
        package = ModelPackage.load(model_dir)
        # The server's own loading: its engine options, and the variant chosen for the
        # providers the session got.
        settings = settings.model_copy(update={"precision": precision})
        self.engine, self.precision, _ = load_engine(settings, package)
        threads = settings.thread_plan(gpu=self.engine.device != "cpu")  # as the runtime
        self.concurrency = device_policy(settings, threads, self.engine.device).concurrent_batches
        self.preprocess = ImagePreprocessor(
            package.manifest.preprocessing, settings.max_image_pixels
        )
        self.pool = ThreadPoolExecutor(threads.decode_workers)
        self.engine.warm_up([1, 2, 4, 8, 16])

    def close(self) -> None:
        self.pool.shutdown()

    def throughput(self, jpegs: list[bytes], batch_size: int, seconds: float) -> float:
        """Images/s, the best of one decode-then-run loop and one per concurrent batch."""
        rates = [self._throughput(jpegs, batch_size, seconds, 1)]
        if self.concurrency > 1:
            rates.append(self._throughput(jpegs, batch_size, seconds, self.concurrency))
        return max(rates)

    def _throughput(self, jpegs: list[bytes], batch_size: int, seconds: float, loops: int) -> float:
        stop = time.perf_counter() + seconds

        def loop(offset: int) -> int:
            count = 0
            while time.perf_counter() < stop:
                batch = [jpegs[(offset + count + i) % len(jpegs)] for i in range(batch_size)]
                pixels = np.stack(list(self.pool.map(self.preprocess, batch)))
                self.engine.run(pixels, alone=loops == 1)
                count += batch_size
            return count

        started = time.perf_counter()
        with ThreadPoolExecutor(loops) as runners:
            total = sum(runners.map(loop, range(loops)))
        return total / (time.perf_counter() - started)

    def best_batch_size(self, jpegs: list[bytes], sizes: tuple[int, ...], seconds: float) -> int:
        rates = {size: self._throughput(jpegs, size, seconds, 1) for size in sizes}
        return max(rates, key=lambda size: rates[size])

    def single_image(self, jpegs: list[bytes], repeats: int) -> dict[str, float]:
        """Median ms of one image at a time: decode, inference, and the two together."""
        decode, infer, total = [], [], []
        for index in range(repeats):
            started = time.perf_counter()
            pixels = self.preprocess(jpegs[index % len(jpegs)])
            decoded = time.perf_counter()
            self.engine.run(pixels[None], alone=True)
            done = time.perf_counter()
            decode.append(decoded - started)
            infer.append(done - decoded)
            total.append(done - started)
        return {
            "single_image_ms": statistics.median(total) * 1000,
            "decode_ms": statistics.median(decode) * 1000,
            "infer_batch1_ms": statistics.median(infer) * 1000,
        }


def main(argv: list[str] | None = None) -> int:
    """Print the ceiling as JSON: run under `taskset` to measure it on some of the cores."""
    import argparse
    import json

    from loadtests import images
    from loadtests.cli import settings_from_flags

    parser = argparse.ArgumentParser(prog="python -m loadtests.ceiling", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--server-args", default="", help="resnet-serve flags that apply")
    args = parser.parse_args(argv)
    settings = settings_from_flags(args.server_args.split())
    inproc = InProcess(args.model_dir, Precision(args.precision), settings)
    try:
        small = images.small_jpegs()
        batch_size = inproc.best_batch_size(small, (1, 2, 4, 8, 16), 1.5)
        result = {
            "batch_size": batch_size,
            "images_per_s": inproc.throughput(small, batch_size, args.seconds),
            **inproc.single_image(small, 20),
            "threads": settings.thread_plan().describe(),
        }
    finally:
        inproc.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
