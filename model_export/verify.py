"""Parity checks: does a graph reproduce its reference, within its precision's tolerance?

FP32 is compared with the PyTorch model it came from; FP16 and INT8 with the FP32 graph.
Each comparison runs on real photos and on random pixels, at batch 1 and at a larger
batch, so a broken dynamic batch axis fails as loudly as a broken weight.

Tolerances (see docs/model-package.md):
- `logits_max_rel_diff`: max |a - b| over all logits, divided by max |reference logit|.
- `*_min_cosine`: the worst per-image cosine similarity between the two vectors.
- `top1_agreement`, `top5_overlap`: the share of images whose top-1 class is the same, and
  the mean share of the top-5 classes the two have in common; on photos only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model_package import Precision, Verification, VerificationCheck

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

Tolerances = dict[str, dict[str, float]]  # input set name → figure → bound

_FP32 = {
    "logits_max_rel_diff": 1e-4,
    "logits_min_cosine": 0.99999,
    "embedding_min_cosine": 0.99999,
}
_FP16 = {"logits_max_rel_diff": 1e-2, "logits_min_cosine": 0.999, "embedding_min_cosine": 0.999}
_INT8 = {"logits_max_rel_diff": 0.15, "logits_min_cosine": 0.98, "embedding_min_cosine": 0.98}
# On held-out photos INT8 must also keep the mean per-image cosines this high.
_INT8_MEAN = {"logits_mean_cosine": 0.98, "embedding_mean_cosine": 0.99}
# Random pixels are far outside what INT8 was calibrated on and give near-tied logits, so
# only the direction of the outputs is held to a bound there, not their size or ranking.
TOLERANCES: dict[Precision, Tolerances] = {
    Precision.FP32: {
        "photos": {**_FP32, "top1_agreement": 1.0, "top5_overlap": 0.99},
        "random": _FP32,
    },
    Precision.FP16: {
        "photos": {**_FP16, "top1_agreement": 0.9, "top5_overlap": 0.9},
        "random": _FP16,
    },
    Precision.INT8: {
        "photos": {**_INT8, **_INT8_MEAN, "top1_agreement": 0.8, "top5_overlap": 0.7},
        "random": {"logits_min_cosine": 0.98, "embedding_min_cosine": 0.98},
    },
}
_LOWER_IS_BETTER = {"logits_max_rel_diff"}
LARGE_BATCH = 8


@dataclass(frozen=True)
class InputSet:
    name: str  # "photos" or "random"
    pixels: np.ndarray  # [N, crop, crop, 3] uint8


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxRunner:
    """One ONNX Runtime session as a `Runner`. `provider` is the one the session actually
    runs on: ONNX Runtime falls back to the CPU when CUDA cannot start, and a check must
    say where it ran."""

    def __init__(
        self, model: Path | bytes, threads: int = 0, providers: Sequence[str] = (CPU,)
    ) -> None:
        """`model`: a graph's file, or a serialised graph held in memory."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self._session = ort.InferenceSession(source, options, providers=list(providers))
        self._input_name = self._session.get_inputs()[0].name
        self.provider: str = self._session.get_providers()[0]

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self._session.run(["logits", "embedding"], {self._input_name: pixels})
        return logits, embedding


def onnx_runner(path: Path, threads: int = 0) -> OnnxRunner:
    """The FP32 graph and INT8 (a CPU format) run on the CPU provider."""
    return OnnxRunner(path, threads)


def fp16_runner(path: Path, threads: int = 0) -> OnnxRunner:
    """FP16 runs where it is served: on CUDA when this ONNX Runtime build has it and a GPU
    can be used. On the CPU provider ONNX Runtime wraps FP16 kernels it lacks in casts, so
    a CPU check does not test the GPU's FP16 arithmetic; `provider` records which ran."""
    providers = [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    return OnnxRunner(path, threads, providers)


def run_batched(
    runner: Runner, pixels: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    outputs = [
        runner(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)
    ]
    return (
        np.concatenate([logits for logits, _ in outputs]),
        np.concatenate([embedding for _, embedding in outputs]),
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each row of `a` with the same row of `b`."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def compare(
    candidate: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    *,
    inputs: str,
    batch_size: int,
    tolerances: dict[str, float],
) -> VerificationCheck:
    """Figures for one comparison; `tolerances` are the bounds for this input set."""
    (logits, embedding), (ref_logits, ref_embedding) = candidate, reference
    logits_abs = float(np.max(np.abs(logits - ref_logits)))
    scale = float(np.max(np.abs(ref_logits))) or 1.0
    logits_cosines = cosines(logits, ref_logits)
    embedding_cosines = cosines(embedding, ref_embedding)
    k = min(5, logits.shape[1])
    top5 = _top_k(logits, k)
    ref_top5 = _top_k(ref_logits, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top5, ref_top5, strict=True)])
    figures = {
        "logits_max_abs_diff": logits_abs,
        "logits_max_rel_diff": logits_abs / scale,
        "embedding_max_abs_diff": float(np.max(np.abs(embedding - ref_embedding))),
        "embedding_min_cosine": float(np.min(embedding_cosines)),
        "logits_min_cosine": float(np.min(logits_cosines)),
        "embedding_mean_cosine": float(np.mean(embedding_cosines)),
        "logits_mean_cosine": float(np.mean(logits_cosines)),
        "top1_agreement": float(np.mean(top5[:, 0] == ref_top5[:, 0])),
        "top5_overlap": float(overlap),
    }
    passed = not _out_of_bounds(figures, tolerances)
    return VerificationCheck(
        inputs=inputs, batch_size=batch_size, images=len(logits), passed=passed, **figures
    )


def _out_of_bounds(figures: Mapping[str, float | None], tolerances: dict[str, float]) -> list[str]:
    """Each figure that breaks its bound, as `name=value (needs >= bound)`."""
    broken = []
    for name, bound in tolerances.items():
        value = figures[name]
        if value is None:  # a figure older manifests do not record
            continue
        lower_is_better = name in _LOWER_IS_BETTER
        ok = value <= bound if lower_is_better else value >= bound
        if not ok or not np.isfinite(value):
            broken.append(
                f"{name}={value:.6g} (needs {'<=' if lower_is_better else '>='} {bound:g})"
            )
    return broken


def verify(
    candidate: Runner,
    reference: Runner,
    input_sets: list[InputSet],
    precision: Precision,
    reference_name: str,
    photo_names: list[str] | None = None,
    provider: str = CPU,
) -> Verification:
    tolerances = TOLERANCES[precision]
    checks = []
    for input_set in input_sets:
        expected = run_batched(reference, input_set.pixels, LARGE_BATCH)
        for batch_size in (1, LARGE_BATCH):
            got = run_batched(candidate, input_set.pixels, batch_size)
            checks.append(
                compare(
                    got,
                    expected,
                    inputs=input_set.name,
                    batch_size=batch_size,
                    tolerances=tolerances[input_set.name],
                )
            )
    return Verification(
        reference=reference_name,
        tolerances=tolerances,
        checks=checks,
        passed=all(check.passed for check in checks),
        photos=photo_names or [],
        provider=provider,
    )


def failure_summary(verification: Verification) -> str:
    """One line naming each check that failed and the figures that broke their bounds."""
    parts = [
        f"{check.inputs} at batch {check.batch_size}: "
        + ", ".join(_out_of_bounds(check.model_dump(), verification.tolerances[check.inputs]))
        for check in verification.checks
        if not check.passed
    ]
    return "; ".join(parts)
