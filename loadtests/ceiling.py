"""The ceiling: the same work in-process with no HTTP, using the service's own pieces
(`ImagePreprocessor`, `InferenceEngine`) with the server's default thread settings."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.config import Settings
from service.engine import EngineOptions, InferenceEngine, choose_variant, resolve_providers
from service.model_package import ModelPackage, Precision
from service.preprocess import ImagePreprocessor


@dataclass
class Ceiling:
    precision: str
    single_image_ms: float  # decode + preprocess + inference of one image, median
    decode_ms: float  # one image, single thread, median
    infer_batch1_ms: float
    best_batch_size: int
    images_per_s: float  # decode (pool) + inference at the best batch size
    by_batch_size: dict[int, float]


def measure_ceiling(
    model_dir: Path,
    precision: Precision,
    jpegs: list[bytes],
    settings: Settings,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    images: int = 48,
    repeats: int = 15,
) -> Ceiling:
    package = ModelPackage.load(model_dir)
    providers = resolve_providers(settings.providers)
    served, path, _ = choose_variant(package, precision, providers)
    engine = InferenceEngine(
        path,
        EngineOptions(
            providers=providers,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            allow_spinning=settings.allow_spinning,
        ),
    )
    preprocess = ImagePreprocessor(package.manifest.preprocessing, settings.max_image_pixels)
    engine.warm_up(list(batch_sizes))
    decode_times, infer_times, total_times = [], [], []
    for index in range(repeats):
        data = jpegs[index % len(jpegs)]
        started = time.perf_counter()
        pixels = preprocess(data)
        decoded = time.perf_counter()
        engine.run(pixels[None])
        done = time.perf_counter()
        decode_times.append(decoded - started)
        infer_times.append(done - decoded)
        total_times.append(done - started)
    workload = [jpegs[index % len(jpegs)] for index in range(images)]
    by_batch: dict[int, float] = {}
    with ThreadPoolExecutor(settings.decode_workers) as pool:
        list(pool.map(preprocess, workload[:8]))  # warm the pool
        for batch_size in batch_sizes:
            started = time.perf_counter()
            pixels = np.stack(list(pool.map(preprocess, workload)))
            for start in range(0, images, batch_size):
                engine.run(pixels[start : start + batch_size])
            by_batch[batch_size] = images / (time.perf_counter() - started)
    best = max(by_batch, key=lambda size: by_batch[size])
    return Ceiling(
        precision=str(served),
        single_image_ms=statistics.median(total_times) * 1000,
        decode_ms=statistics.median(decode_times) * 1000,
        infer_batch1_ms=statistics.median(infer_times) * 1000,
        best_batch_size=best,
        images_per_s=by_batch[best],
        by_batch_size=by_batch,
    )
