"""The model package on disk: the contract between `resnet-export` and `resnet-serve`.

A package is a directory holding `manifest.json`, `labels.json` and one ONNX file per
precision variant. This module owns the schema of the manifest, so the exporter writes
exactly what the service reads.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
# 2: MMPretrain sources, mean cosines per check, held-out photo names, failed variants.
# 3: `export`, what the export itself cost (its peak RSS).
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)  # formats 1 and 2 lack only fields that have defaults here


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


VARIANT_FILES: dict[Precision, str] = {
    Precision.FP32: "model.onnx",
    Precision.FP16: "model.fp16.onnx",
    Precision.INT8: "model.int8.onnx",
}


class Interpolation(StrEnum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessSpec(_Strict):
    """How a photo becomes the graph's uint8 input; normalisation itself is inside the graph."""

    resize: int = Field(256, description="The shorter side is resized to this many pixels.")
    crop: int = Field(224, description="Then a centred square of this size is cut out.")
    interpolation: Interpolation = Interpolation.BILINEAR
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: Literal["RGB"] = "RGB"
    layout: Literal["NHWC"] = "NHWC"


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]


class Source(_Strict):
    kind: Literal["torchvision", "weights-file", "huggingface", "mmpretrain", "random-init"]
    weights: str | None = Field(None, description="torchvision weights enum, e.g. IMAGENET1K_V2")
    path: str | None = None
    sha256: str | None = Field(None, description="SHA-256 of the weights file the model came from")
    seed: int | None = None


class VerificationCheck(_Strict):
    """One comparison of a graph against its reference on one set of inputs."""

    inputs: str
    batch_size: int
    images: int
    logits_max_abs_diff: float
    logits_max_rel_diff: float
    embedding_max_abs_diff: float
    embedding_min_cosine: float
    logits_min_cosine: float
    top1_agreement: float
    top5_overlap: float
    passed: bool
    # Format 2: the mean per-image cosines (INT8 is bounded on these too).
    logits_mean_cosine: float | None = None
    embedding_mean_cosine: float | None = None


class Verification(_Strict):
    reference: str
    tolerances: dict[str, dict[str, float]]  # input set → figure → bound
    checks: list[VerificationCheck]
    passed: bool
    # Format 2: the photos checked, by file name; never among the INT8 calibration images.
    photos: list[str] = []
    # The execution provider the candidate ran on (FP16 on CUDA where the exporting host
    # has a GPU); packages that predate this field were all checked on the CPU.
    provider: str = "CPUExecutionProvider"


class Variant(_Strict):
    precision: Precision
    file: str
    sha256: str
    bytes: int
    verification: Verification
    notes: list[str] = []


class FailedVariant(_Strict):
    """A variant that failed its tolerances and was left out (`--skip-failed-variants`)."""

    precision: Precision
    reason: str
    verification: Verification


class ExportRun(_Strict):
    """Format 3: what the export cost where it ran, to size the machine that reruns it."""

    peak_rss_bytes: int  # the exporting process's peak resident set size
    seconds: float


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str
    version: str
    created_at: str
    arch: str
    trained: bool
    source: Source
    num_classes: int
    embedding_dim: int
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: PreprocessSpec
    labels_file: str = LABELS_FILE
    variants: dict[Precision, Variant]
    calibration: dict[str, Any] | None = None
    tools: dict[str, str]
    failed_variants: dict[Precision, FailedVariant] = {}
    export: ExportRun | None = None  # format 3

    @property
    def input_name(self) -> str:
        return self.inputs[0].name


class PackageError(Exception):
    """The model directory is missing, incomplete or not a package this version can read."""


def _check_format_version(path: Path, data: bytes) -> None:
    """Before the schema: a newer package has fields this server cannot know about."""
    try:
        version = json.loads(data).get("format_version")
    except (ValueError, AttributeError):
        return  # not a JSON object: the schema check says what is wrong
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise PackageError(
            f"{path} has format_version {version}, newer than this resnet-serve reads "
            f"({', '.join(map(str, READABLE_FORMATS))}): upgrade resnet-serve to serve it"
        )
    if version not in READABLE_FORMATS:
        raise PackageError(
            f"{path} has format_version {version!r}; this resnet-serve reads "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )


class ModelPackage:
    """A loaded manifest and label list, with the path of each variant's graph."""

    def __init__(self, directory: Path, manifest: Manifest, labels: list[str]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.labels = labels

    @classmethod
    def load(cls, directory: str | Path) -> ModelPackage:
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise PackageError(
                f"{directory} is not a model package: {MANIFEST_FILE} is missing "
                f"(create one with `resnet-export --out {directory}`)"
            )
        data = manifest_path.read_bytes()
        _check_format_version(manifest_path, data)
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as exc:
            raise PackageError(f"{manifest_path} is not a valid manifest: {exc}") from exc
        labels_path = directory / manifest.labels_file
        try:
            labels = json.loads(labels_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PackageError(f"cannot read labels from {labels_path}: {exc}") from exc
        if not isinstance(labels, list) or len(labels) != manifest.num_classes:
            raise PackageError(
                f"{labels_path} must be a list of {manifest.num_classes} class names"
            )
        for precision, variant in manifest.variants.items():
            if not (directory / variant.file).is_file():
                raise PackageError(f"variant {precision} names {variant.file}, which is missing")
        return cls(directory, manifest, [str(label) for label in labels])

    def verify(self, precision: Precision) -> None:
        """Check the variant's graph against the size and SHA-256 its manifest records, so
        a truncated copy or a file swapped behind the manifest's back is never served."""
        variant = self.manifest.variants[precision]
        path = self.directory / variant.file
        size = path.stat().st_size
        if size != variant.bytes:
            raise PackageError(
                f"{variant.file} is {size} bytes; the manifest says {variant.bytes} "
                "(a truncated or replaced file)"
            )
        with path.open("rb") as graph:
            digest = hashlib.file_digest(graph, "sha256").hexdigest()
        if digest != variant.sha256:
            raise PackageError(
                f"{variant.file} has SHA-256 {digest}; the manifest says {variant.sha256} "
                "(a corrupt or replaced file)"
            )

    def variant_path(self, precision: Precision) -> Path | None:
        variant = self.manifest.variants.get(precision)
        return None if variant is None else self.directory / variant.file
