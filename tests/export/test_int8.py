"""INT8 on weights that behave like trained ones, held-out verification, failed variants,
and the manifest's format version.

A fresh random init flatters INT8: its activations are unlike a trained network's. Here
every BatchNorm's running statistics are re-estimated on real photos (train-mode forward
passes), which gives trained-like activation ranges; the INT8 variant must still hold
(mean logits cosine >= 0.98, mean embedding cosine >= 0.99 against FP32) on photos held
out from calibration, on two weight sets (their own seeds and BatchNorm photos). The
export runs in a child process, whose peak memory is held to a bound. `python -m
model_export.int8_fidelity build --arch resnet50 --out DIR` measures the same on ResNet-50
(figures in docs/model-package.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from model_export import calibration, photos, verify
from model_export.cli import main
from service import cli as serve_cli
from service.model_package import FORMAT_VERSION, ModelPackage, PackageError, Precision
from tests.conftest import sample_dir
from tests.export.test_export import cosines, error_line, normalised, run_onnx, snapshot

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The shipped photos' two halves, named here so a change to either is a visible decision.
CALIBRATION = {"astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png"}
CALIBRATION |= {"hubble_deep_field.jpg", "retina.jpg", "coins.png", "brick.png"}
HELD_OUT = {"chelsea.png", "rocket.jpg", "ihc.png", "camera.png", "moon.png", "grass.png"}
HELD_OUT |= {"gravel.png", "cell.png"}


def reestimated_resnet18(seed: int, batchnorm_photos: set[str]) -> nn.Module:
    """Random init, then BatchNorm running statistics re-estimated on photo crops."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=1000)
    rng = np.random.default_rng(seed)
    crops = []
    for name in sorted(batchnorm_photos):
        image = np.asarray(Image.open(sample_dir() / name).convert("RGB"))
        height, width = image.shape[:2]
        for _ in range(4):
            side = int(min(height, width) * rng.uniform(0.5, 1.0))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(image[top : top + side, left : left + side])
            crops.append(np.asarray(crop.resize((224, 224))))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(crops), 8):
            model(normalised(np.stack(crops[start : start + 8]), IMAGENET_MEAN, IMAGENET_STD))
    return model.eval()


@dataclass(frozen=True)
class ChildExport:
    out: Path
    peak_rss_bytes: int  # the kernel's account of the child alone (os.wait4)


# The export runs as a grandchild of pytest, forked from this small launcher: Linux starts
# a child's peak RSS at its parent's RSS when it forks (and keeps it across exec), so a
# child forked from pytest, gigabytes by then, would report pytest's size, not its own.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def export_in_child(out: Path, *argv: str) -> ChildExport:
    """`resnet-export` in its own process, so its peak memory is its own, not pytest's."""
    log = out.with_suffix(".log")
    peak_kib = out.with_suffix(".maxrss")
    command = [sys.executable, "-m", "model_export", *argv, "--out", str(out), "--quiet"]
    with log.open("wb") as output:
        result = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(peak_kib), *command],
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
        )
    assert result.returncode == 0, log.read_text()
    return ChildExport(out, int(peak_kib.read_text()) * 1024)


# Two weight sets the INT8 scheme was not tuned on, as model_export.int8_fidelity builds
# them for ResNet-50: each its own seed and its own BatchNorm photos (A: the calibration
# half, B: the held-out half, so B's activations come from photos calibration never saw).
WEIGHT_SETS = {"A": (0, CALIBRATION), "B": (1, HELD_OUT)}


@pytest.fixture(scope="module", params=sorted(WEIGHT_SETS))
def reestimated_export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ChildExport:
    seed, batchnorm_photos = WEIGHT_SETS[request.param]
    base = tmp_path_factory.mktemp(f"reestimated-{request.param}")
    weights = base / "resnet18-reestimated.pth"
    torch.save(reestimated_resnet18(seed, batchnorm_photos).state_dict(), weights)
    return export_in_child(
        base / "package",
        "--arch",
        "resnet18",
        "--weights-file",
        str(weights),
        "--precision",
        "int8",
    )


@pytest.fixture(scope="module")
def reestimated_package(reestimated_export: ChildExport) -> Path:
    return reestimated_export.out


# The calibration holds one batch of intermediate tensors at a time (calibration.py):
# ResNet-18 FP32 + INT8 peaked at 1.28 GiB RSS here, 3.12 GiB when every calibration image's
# intermediate tensors were held at once (docs/model-package.md#export-memory).
RESNET18_EXPORT_PEAK_BOUND = 2 * 2**30


def test_export_memory_is_bounded_and_reported(reestimated_export: ChildExport) -> None:
    assert reestimated_export.peak_rss_bytes <= RESNET18_EXPORT_PEAK_BOUND
    manifest = ModelPackage.load(reestimated_export.out).manifest
    assert manifest.export is not None
    # The export's own report is its peak so far when the manifest is written: everything
    # but the last writes, so within a little of what the kernel saw.
    reported = manifest.export.peak_rss_bytes
    assert 0.9 * reestimated_export.peak_rss_bytes <= reported <= reestimated_export.peak_rss_bytes
    assert manifest.export.seconds > 0
    assert manifest.calibration is not None
    assert manifest.calibration["calibration_batch"] == calibration.CALIBRATION_BATCH
    log = reestimated_export.out.with_suffix(".log").read_text()
    assert f"export peak RSS {reported / 2**30:.2f} GiB" in log


def test_sample_photo_halves_are_disjoint() -> None:
    assert set(photos.CALIBRATION_PHOTO_NAMES) == CALIBRATION
    assert set(photos.VERIFICATION_PHOTO_NAMES) == HELD_OUT
    assert set(photos.SAMPLE_PHOTO_NAMES) == CALIBRATION | HELD_OUT


def test_int8_holds_on_reestimated_batchnorm(reestimated_package: Path) -> None:
    package = ModelPackage.load(reestimated_package)
    manifest = package.manifest
    int8 = manifest.variants[Precision.INT8]
    # Verified on held-out photos only: none of them was a calibration image.
    assert manifest.calibration is not None
    assert set(manifest.calibration["files"]) == CALIBRATION
    assert set(int8.verification.photos) == HELD_OUT
    assert set(manifest.variants[Precision.FP32].verification.photos) == HELD_OUT
    bounds = verify.TOLERANCES[Precision.INT8]["photos"]
    assert bounds["logits_mean_cosine"] == 0.98
    assert bounds["embedding_mean_cosine"] == 0.99

    # Independently of the manifest: both graphs on the held-out photos.
    files = [sample_dir() / name for name in sorted(HELD_OUT)]
    pixels = photos.preprocess_files(files, manifest.preprocessing)
    fp32 = run_onnx(reestimated_package / "model.onnx", pixels)
    quantised = run_onnx(reestimated_package / "model.int8.onnx", pixels)
    logits = cosines(quantised["logits"], fp32["logits"])
    embedding = cosines(quantised["embedding"], fp32["embedding"])
    assert logits.mean() >= 0.98
    assert embedding.mean() >= 0.99
    assert np.mean(quantised["logits"].argmax(1) == fp32["logits"].argmax(1)) >= 0.8
    assert not np.array_equal(quantised["embedding"], fp32["embedding"])
    photo_checks = [check for check in int8.verification.checks if check.inputs == "photos"]
    assert photo_checks
    for check in photo_checks:
        assert check.images == len(HELD_OUT)
        assert check.logits_mean_cosine == pytest.approx(float(logits.mean()), abs=1e-3)
        assert check.embedding_mean_cosine == pytest.approx(float(embedding.mean()), abs=1e-3)


def test_int8_keeps_stem_stage1_and_classifier_in_float(reestimated_package: Path) -> None:
    model = onnx.load(str(reestimated_package / "model.int8.onnx"))
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {init.name for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 20  # ResNet-18
    # The stem and stage 1's two basic blocks (4 convolutions) keep float weights; every
    # later convolution's weight is int8, dequantised in the graph.
    floats, rest = convs[:5], convs[5:]
    for conv in floats:
        assert conv.input[1] in initializers
    for conv in rest:
        assert producers[conv.input[1]].op_type == "DequantizeLinear"
    stem = floats[0]
    classifier = producers["logits"]
    assert classifier.op_type == "Gemm"
    assert classifier.input[1] in initializers
    manifest = ModelPackage.load(reestimated_package).manifest
    assert manifest.calibration is not None
    assert manifest.calibration["float_layers"] == "stem-stage1-classifier"
    assert manifest.calibration["calibration_method"] == "Percentile (99.99)"
    assert stem.name in manifest.calibration["float_nodes"]


# ------------------------------------------------------------------ failed variants


@pytest.fixture
def impossible_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds = verify.TOLERANCES[Precision.INT8]
    impossible = {
        name: {**figures, "embedding_min_cosine": 1.5} for name, figures in bounds.items()
    }
    monkeypatch.setitem(verify.TOLERANCES, Precision.INT8, impossible)


@pytest.mark.usefixtures("impossible_int8")
def test_failed_variant_fails_the_export_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    before = snapshot(tmp_path)
    code = main(
        [
            "--random-init",
            "--arch",
            "resnet18_cifar",
            "--num-classes",
            "10",
            "--precision",
            "int8",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 3
    line = error_line(capsys.readouterr().err)
    assert "int8" in line
    assert "embedding_min_cosine" in line
    assert snapshot(tmp_path) == before


@pytest.mark.usefixtures("impossible_int8")
def test_skip_failed_variants_writes_the_package_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    code = main(
        [
            "--random-init",
            "--arch",
            "resnet18_cifar",
            "--num-classes",
            "10",
            "--precision",
            "int8",
            "--precision",
            "fp16",
            "--skip-failed-variants",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int8 FAILED" in captured.out
    assert "WARNING" in captured.err
    assert sorted(path.name for path in out.iterdir()) == [
        "labels.json",
        "manifest.json",
        "model.fp16.onnx",
        "model.onnx",
    ]
    package = ModelPackage.load(out)
    assert set(package.manifest.variants) == {Precision.FP32, Precision.FP16}
    failed = package.manifest.failed_variants[Precision.INT8]
    assert "embedding_min_cosine" in failed.reason
    assert failed.verification.passed is False
    assert failed.verification.tolerances["photos"]["embedding_min_cosine"] == 1.5
    assert all(0.9 < check.embedding_min_cosine <= 1.0 for check in failed.verification.checks)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 3


# -------------------------------------------------------------------- format version


def _rewrite(package: Path, target: Path, edit: dict[str, object], drop: tuple[str, ...]) -> Path:
    target.mkdir()
    raw = json.loads((package / "manifest.json").read_text())
    for key in drop:
        raw.pop(key, None)
    raw.update(edit)
    (target / "manifest.json").write_text(json.dumps(raw))
    for path in package.iterdir():
        if path.name != "manifest.json":
            (target / path.name).symlink_to(path)
    return target


def test_newer_format_is_refused_with_one_line(
    resnet18_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    newer = _rewrite(
        resnet18_package, tmp_path / "newer", {"format_version": 4, "new_field": {"x": 1}}, ()
    )
    with pytest.raises(PackageError, match="format_version 4, newer than") as raised:
        ModelPackage.load(newer)
    assert "\n" not in str(raised.value)
    code = serve_cli.main(["--model-dir", str(newer)])
    stderr = capsys.readouterr().err
    assert code != 0
    assert stderr.strip().splitlines() == [f"resnet-serve: error: {raised.value}"]
    assert "upgrade resnet-serve" in stderr


def test_format_1_package_still_loads(resnet18_package: Path, tmp_path: Path) -> None:
    raw = json.loads((resnet18_package / "manifest.json").read_text())
    for variant in raw["variants"].values():
        variant["verification"].pop("photos", None)
        for check in variant["verification"]["checks"]:
            check.pop("logits_mean_cosine", None)
            check.pop("embedding_mean_cosine", None)
    old = _rewrite(
        resnet18_package, tmp_path / "old", {**raw, "format_version": 1}, ("failed_variants",)
    )
    package = ModelPackage.load(old)
    assert package.manifest.format_version == 1
    assert package.manifest.failed_variants == {}
    check = package.manifest.variants[Precision.FP32].verification.checks[0]
    assert check.logits_mean_cosine is None


def test_format_2_package_still_loads(resnet18_package: Path, tmp_path: Path) -> None:
    raw = json.loads((resnet18_package / "manifest.json").read_text())
    assert raw["export"]["peak_rss_bytes"] > 0
    old = _rewrite(resnet18_package, tmp_path / "old", {"format_version": 2}, ("export",))
    package = ModelPackage.load(old)
    assert package.manifest.format_version == 2
    assert package.manifest.export is None
