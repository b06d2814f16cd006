"""INT8 fidelity and speed of each quantisation scheme, on two sets of weights that behave
like trained ones and that no scheme was tuned on:

    python -m model_export.int8_fidelity build --arch resnet50 --out /tmp/int8-study
    python -m model_export.int8_fidelity speed --out /tmp/int8-study    # timings: run alone
    python -m model_export.int8_fidelity table --out /tmp/int8-study

A fresh random init has activations unlike a trained network's (BatchNorm statistics of
zero mean and unit variance that no real input produces), which flatters INT8. Re-estimating
every BatchNorm's running statistics on real photos (train-mode forward passes, cumulative
average) gives activation ranges like a trained network's, on which naive INT8 breaks. Each
weight set has its own seed and its own BatchNorm photos; every scheme is calibrated as the
export calibrates (the calibration half of the sample photos, augmented) and checked by the
export's own gate (`verify.verify`, the INT8 tolerances) on the held-out half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from model_export import graph, photos, sources, variants, verify
from model_export.cli import CALIBRATION_CROPS_PER_IMAGE, CALIBRATION_JITTER
from service.model_package import Precision, PreprocessSpec, Verification

Scheme = variants.Int8Scheme


@dataclass(frozen=True)
class WeightSet:
    name: str
    seed: int
    batchnorm_photos: tuple[str, ...]
    about: str


WEIGHT_SETS = (
    WeightSet("A", 0, photos.CALIBRATION_PHOTO_NAMES, "seed 0, BN on the calibration photos"),
    WeightSet("B", 1, photos.VERIFICATION_PHOTO_NAMES, "seed 1, BN on the held-out photos"),
)
SCHEMES: dict[str, Scheme] = {
    "p99.99 sym, islands (before)": Scheme(),
    "p99.99 sym, none": Scheme(float_layers="none"),
    "p99.99 asym, none": Scheme(float_layers="none", symmetric_ranges=False),
    "p99.999 asym, none": Scheme(percentile=99.999, float_layers="none", symmetric_ranges=False),
    "p99.999 asym, per-tensor w, none": Scheme(
        percentile=99.999, float_layers="none", symmetric_ranges=False, per_channel=False
    ),
    "p99.999 asym, asym w, none": Scheme(
        percentile=99.999, float_layers="none", symmetric_ranges=False, weight_symmetric=False
    ),
    "minmax, none": Scheme(method="minmax", float_layers="none", symmetric_ranges=False),
    "entropy, none": Scheme(method="entropy", float_layers="none", symmetric_ranges=False),
    "p99.999 asym, pixel-range input, none": Scheme(
        percentile=99.999, float_layers="none", symmetric_ranges=False, pixel_range_input=True
    ),
    "p99.99 asym, pixel-range input, none": Scheme(
        float_layers="none", symmetric_ranges=False, pixel_range_input=True
    ),
    "minmax, pixel-range input, none": Scheme(
        method="minmax", float_layers="none", symmetric_ranges=False, pixel_range_input=True
    ),
    "p99.999 asym, stem + classifier": Scheme(
        percentile=99.999, float_layers="stem-classifier", symmetric_ranges=False
    ),
    "p99.999 asym, islands": Scheme(percentile=99.999, symmetric_ranges=False),
    "p99.9 sym, islands": Scheme(percentile=99.9),
    "p99.999 sym, islands": Scheme(percentile=99.999),
    "minmax, islands": Scheme(method="minmax", symmetric_ranges=False),
    "entropy, islands": Scheme(method="entropy", symmetric_ranges=False),
    "mse, none": Scheme(method="mse", float_layers="none", symmetric_ranges=False),
    "mse, stem + classifier": Scheme(
        method="mse", float_layers="stem-classifier", symmetric_ranges=False
    ),
    "mse, islands": Scheme(method="mse", symmetric_ranges=False),
    "p99.9 asym, none": Scheme(percentile=99.9, float_layers="none", symmetric_ranges=False),
}


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


def build_weights(arch: str, weights: WeightSet) -> sources.LoadedModel:
    loaded = sources.load_random_init(arch, weights.seed, None)
    pixels = photos.augmented_crops(
        photos.sample_photos(weights.batchnorm_photos),
        loaded.preprocessing,
        8,
        seed=weights.seed + 1,
    )
    reestimate_batchnorm(graph.ServingResNet(loaded), pixels)
    return loaded


def calibration_set(spec: PreprocessSpec, seed: int = 0) -> np.ndarray:
    """What the export calibrates on by default (cli.calibration_pixels)."""
    return photos.augmented_crops(
        photos.sample_photos(photos.CALIBRATION_PHOTO_NAMES),
        spec,
        CALIBRATION_CROPS_PER_IMAGE,
        seed=seed,
        jitter=CALIBRATION_JITTER,
    )


def gate_inputs(spec: PreprocessSpec) -> list[verify.InputSet]:
    """The export's verification inputs: held-out photos and random pixels."""
    held_out = photos.sample_photos(photos.VERIFICATION_PHOTO_NAMES)
    return [
        verify.InputSet("photos", photos.preprocess_files(held_out, spec)),
        verify.InputSet("random", photos.random_pixels(4, spec.crop, 1234)),
    ]


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in name)


def _calibration_key(scheme: Scheme) -> str:
    if scheme.method == "mse":
        return "mse"
    return f"{scheme.method}-{scheme.percentile:g}-{'sym' if scheme.symmetric_ranges else 'asym'}"


def _figures(report: Verification) -> dict[str, object]:
    photo8 = next(c for c in report.checks if c.inputs == "photos" and c.batch_size == 8)
    random_min = min(c.logits_min_cosine for c in report.checks if c.inputs == "random")
    return {
        "logits_mean_cosine": photo8.logits_mean_cosine,
        "logits_min_cosine": photo8.logits_min_cosine,
        "embedding_mean_cosine": photo8.embedding_mean_cosine,
        "embedding_min_cosine": photo8.embedding_min_cosine,
        "top1_agreement": photo8.top1_agreement,
        "random_logits_min_cosine": random_min,
        "gate": "pass" if report.passed else verify.failure_summary(report),
    }


def build(arch: str, out: Path, schemes: dict[str, Scheme]) -> None:
    """Quantise each weight set each way; graphs and figures go to `out`."""
    results_path = out / "fidelity.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for weights in WEIGHT_SETS:
        folder = out / weights.name
        folder.mkdir(parents=True, exist_ok=True)
        fp32 = folder / "model.onnx"
        loaded = build_weights(arch, weights)
        spec = loaded.preprocessing
        if not fp32.exists():
            graph.export_onnx(graph.ServingResNet(loaded), fp32, spec.crop)
        del loaded
        calibration = calibration_set(spec)
        inputs = gate_inputs(spec)
        reference = verify.onnx_runner(fp32)
        for name, scheme in schemes.items():
            path = folder / f"{slug(name)}.onnx"
            started = time.perf_counter()
            cache = folder / f"calibration-{_calibration_key(scheme)}.json"
            variants.to_int8(fp32, path, calibration, graph.INPUT_NAME, spec, scheme, cache)
            seconds = time.perf_counter() - started
            report = verify.verify(
                verify.onnx_runner(path), reference, inputs, Precision.INT8, "fp32-onnx"
            )
            figures = {**_figures(report), "scheme": asdict(scheme), "quantise_s": seconds}
            results.setdefault(weights.name, {})[name] = figures
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{weights.name} {name}: {figures}", flush=True)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speeds(paths: dict[str, Path], pixels: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Median milliseconds per batch for each graph, rounds interleaved across graphs."""
    sessions = {name: _session(path) for name, path in paths.items()}
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


def speed(out: Path, rounds: int, runs: int) -> None:
    """ONNX Runtime (CPU, all cores) at batch 8 and 1 on weight set A's graphs."""
    folder = out / WEIGHT_SETS[0].name
    results = json.loads((out / "fidelity.json").read_text())
    paths = {"fp32": folder / "model.onnx"}
    paths |= {name: folder / f"{slug(name)}.onnx" for name in results[WEIGHT_SETS[0].name]}
    pixels = photos.preprocess_files(
        photos.sample_photos(photos.VERIFICATION_PHOTO_NAMES), PreprocessSpec()
    )
    timing = {
        f"batch{batch}": speeds(paths, pixels[:batch], rounds, runs * (2 if batch == 1 else 1))
        for batch in (8, 1)
    }
    (out / "speed.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing, indent=1))


def table(out: Path) -> str:
    results = json.loads((out / "fidelity.json").read_text())
    timing_path = out / "speed.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    lines = [
        "| scheme | weights | logits cos mean / min | embedding cos mean / min | top-1 "
        "| random-pixel logits cos min | export gate | ms b8 (x FP32) | ms b1 (x FP32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(name for per in results.values() for name in per))
    for name in names:
        for weights in WEIGHT_SETS:
            fig = results.get(weights.name, {}).get(name)
            if fig is None:
                continue
            speed_cells = ""
            for batch in ("batch8", "batch1"):
                ms = timing.get(batch, {}).get(name)
                fp32 = timing.get(batch, {}).get("fp32")
                cell = f"{ms:.1f} ({fp32 / ms:.2f}x)" if ms and fp32 else "–"
                speed_cells += f" {cell if weights is WEIGHT_SETS[0] else ''} |"
            gate = "pass" if fig["gate"] == "pass" else f"fails: {_broken(str(fig['gate']))}"
            lines.append(
                f"| {name} | {weights.name} "
                f"| {fig['logits_mean_cosine']:.4f} / {fig['logits_min_cosine']:.4f} "
                f"| {fig['embedding_mean_cosine']:.4f} / {fig['embedding_min_cosine']:.4f} "
                f"| {fig['top1_agreement']:.0%} | {fig['random_logits_min_cosine']:.4f} "
                f"| {gate} |{speed_cells}"
            )
    return "\n".join(lines)


_SHORT = {
    "logits_max_rel_diff": "rel diff",
    "logits_min_cosine": "logits min",
    "logits_mean_cosine": "logits mean",
    "embedding_min_cosine": "emb min",
    "embedding_mean_cosine": "emb mean",
    "top1_agreement": "top-1",
    "top5_overlap": "top-5",
}


def _broken(summary: str) -> str:
    """`verify.failure_summary` shortened to the names of the broken bounds, per input set."""
    names: list[str] = []
    for part in summary.split("; "):
        inputs, _, figures = part.partition(": ")
        for figure in figures.split(", "):
            name = _SHORT.get(figure.split("=")[0], figure.split("=")[0])
            label = name if inputs.startswith("photos") else f"random {name}"
            if label not in names:
                names.append(label)
    return ", ".join(names)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_export.int8_fidelity")
    parser.add_argument("step", choices=("build", "speed", "table"))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schemes", help="scheme names separated by ; (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.step == "build":
        chosen = SCHEMES
        if args.schemes:
            chosen = {name: SCHEMES[name] for name in args.schemes.split(";")}
        build(args.arch, args.out, chosen)
    elif args.step == "speed":
        speed(args.out, args.rounds, args.runs)
    else:
        print(table(args.out))


if __name__ == "__main__":
    main()
