"""INT8 fidelity and speed of each quantisation choice, on weights that behave like trained
ones: `python -m model_export.int8_fidelity --arch resnet50`.

A fresh random init has activations unlike a trained network's (BatchNorm statistics of
zero mean and unit variance that no real input produces), which flatters INT8. Re-estimating
every BatchNorm's running statistics on real photos (train-mode forward passes, cumulative
average) gives activation ranges like a trained network's, on which naive INT8 breaks. This
module builds such weights, quantises them several ways, and measures each against FP32 on
photos held out from calibration, and ONNX Runtime's speed at batch 8 (interleaved rounds,
medians: the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from model_export import graph, photos, sources, variants
from model_export.cli import CALIBRATION_CROPS_PER_IMAGE, CALIBRATION_JITTER
from service.model_package import PreprocessSpec

# (name, calibration method, what stays in float)
_P = f"percentile {variants.PERCENTILE}"
CHOICES: tuple[tuple[str, str, str], ...] = (
    ("minmax, all quantised (before)", "minmax", "none"),
    ("minmax, float stem + classifier", "minmax", "stem-classifier"),
    (f"{_P}, all quantised", "percentile", "none"),
    (f"{_P}, float stem + classifier", "percentile", "stem-classifier"),
    ("entropy, float stem + classifier", "entropy", "stem-classifier"),
    ("minmax, float stem + stage 1 + classifier", "minmax", "stem-stage1-classifier"),
    (f"{_P}, float stem + stage 1 + classifier (default)", "percentile", "stem-stage1-classifier"),
)


def reestimate_batchnorm(model: nn.Module, pixels: np.ndarray, batch_size: int = 16) -> nn.Module:
    """Every BatchNorm's running mean and variance re-estimated on `pixels`: the cumulative
    average over train-mode forward passes. `model` takes what `pixels` is (for
    `graph.ServingResNet`, uint8 NHWC). Weights are unchanged; returns it in eval mode."""
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative moving average over all batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            model(torch.from_numpy(pixels[start : start + batch_size]))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a64 * b64, axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Fidelity:
    choice: str
    logits_mean_cosine: float
    logits_min_cosine: float
    embedding_mean_cosine: float
    embedding_min_cosine: float
    top1_agreement: float
    batch8_ms: float = float("nan")


def fidelity(fp32: Path, int8: Path, pixels: np.ndarray, choice: str) -> Fidelity:
    ref = _session(fp32, 0).run(None, {graph.INPUT_NAME: pixels})
    got = _session(int8, 0).run(None, {graph.INPUT_NAME: pixels})
    logits, embedding = _cosines(got[0], ref[0]), _cosines(got[1], ref[1])
    return Fidelity(
        choice=choice,
        logits_mean_cosine=float(logits.mean()),
        logits_min_cosine=float(logits.min()),
        embedding_mean_cosine=float(embedding.mean()),
        embedding_min_cosine=float(embedding.min()),
        top1_agreement=float(np.mean(got[0].argmax(1) == ref[0].argmax(1))),
    )


def speeds(paths: dict[str, Path], pixels: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Median milliseconds per batch for each graph, rounds interleaved across graphs."""
    sessions = {name: _session(path, 0) for name, path in paths.items()}
    for session in sessions.values():  # warm-up
        session.run(None, {graph.INPUT_NAME: pixels})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            for _ in range(runs):
                session.run(None, {graph.INPUT_NAME: pixels})
            times[name].append((time.perf_counter() - started) * 1000 / runs)
    return {name: statistics.median(values) for name, values in times.items()}


def build_weights(arch: str, reestimated: bool, seed: int = 0) -> sources.LoadedModel:
    loaded = sources.load_random_init(arch, seed, None)
    if reestimated:
        spec = loaded.preprocessing
        pixels = photos.augmented_crops(
            photos.sample_photos(photos.CALIBRATION_PHOTO_NAMES), spec, 8, seed=seed + 1
        )
        reestimate_batchnorm(graph.ServingResNet(loaded), pixels)
    return loaded


def calibration_set(spec: PreprocessSpec, seed: int) -> np.ndarray:
    return photos.augmented_crops(
        photos.sample_photos(photos.CALIBRATION_PHOTO_NAMES),
        spec,
        CALIBRATION_CROPS_PER_IMAGE,
        seed=seed,
        jitter=CALIBRATION_JITTER,
    )


def run(arch: str, rounds: int, runs: int, choices: Sequence[tuple[str, str, str]]) -> str:
    lines = [
        f"INT8 vs FP32 for {arch} on the {len(photos.VERIFICATION_PHOTO_NAMES)} held-out photos; "
        f"speed at batch 8, median of {rounds} interleaved rounds of {runs} runs, "
        f"{ort.get_device()} with {torch.get_num_threads()} threads",
        "",
        "| weights | choice | logits cos mean / min | embedding cos mean / min | top-1 "
        "| ms / batch 8 |",
        "|---|---|---|---|---|---|",
    ]
    for reestimated in (True, False):
        weights = "BN re-estimated on photos" if reestimated else "random init"
        loaded = build_weights(arch, reestimated)
        spec = loaded.preprocessing
        held_out = photos.preprocess_files(
            photos.sample_photos(photos.VERIFICATION_PHOTO_NAMES), spec
        )
        calibration = calibration_set(spec, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "model.onnx"
            graph.export_onnx(graph.ServingResNet(loaded), fp32, spec.crop)
            results, paths = [], {"fp32": fp32}
            for index, (name, method, float_layers) in enumerate(choices):
                path = Path(tmp) / f"int8-{index}.onnx"
                variants.to_int8(fp32, path, calibration, graph.INPUT_NAME, method, float_layers)
                results.append(fidelity(fp32, path, held_out, name))
                paths[name] = path
            timing = speeds(paths, held_out[:8], rounds, runs)
        lines.append(f"| {weights} | fp32 | 1 | 1 | 100% | {timing['fp32']:.0f} |")
        for result in results:
            lines.append(
                f"| {weights} | {result.choice} "
                f"| {result.logits_mean_cosine:.4f} / {result.logits_min_cosine:.4f} "
                f"| {result.embedding_mean_cosine:.4f} / {result.embedding_min_cosine:.4f} "
                f"| {result.top1_agreement:.0%} | {timing[result.choice]:.0f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_export.int8_fidelity")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(run(args.arch, args.rounds, args.runs, CHOICES), flush=True)


if __name__ == "__main__":
    main()
