"""`resnet-eval`: accuracy of a package's variants and of a live server on a labelled set
the test generates, checked against the graphs run directly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_export.evaluate import main
from service.config import Settings
from service.frontend.app import create_app
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage
from tests.support import running_server

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "resnet-eval: error:"


@dataclass
class LabelledSet:
    folder: Path  # ImageFolder: <class name>/<image>.jpg
    csv: Path  # path,label with indices and names mixed
    labels: np.ndarray
    expected: dict[str, tuple[float, float]]  # precision → (top-1, top-5)
    agreement: float  # fp32 vs int8 top-1


def ranked(package: Path, file: str, bodies: list[bytes]) -> np.ndarray:
    manifest = ModelPackage.load(package).manifest
    preprocess = ImagePreprocessor(manifest.preprocessing, 50_000_000)
    pixels = np.stack([preprocess(body) for body in bodies])
    session = ort.InferenceSession(str(package / file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": pixels})
    return np.argsort(-logits, axis=1, kind="stable")


@pytest.fixture(scope="module")
def labelled(
    tmp_path_factory: pytest.TempPathFactory, resnet18_package: Path, distinct_jpegs: list[bytes]
) -> LabelledSet:
    """16 JPEGs labelled so FP32 gets exactly half right at top-1 and three quarters at
    top-5: the true class is FP32's first choice, its third, or one outside its top 5."""
    base = tmp_path_factory.mktemp("labelled")
    names = ModelPackage.load(resnet18_package).labels
    fp32 = ranked(resnet18_package, "model.onnx", distinct_jpegs)
    int8 = ranked(resnet18_package, "model.int8.onnx", distinct_jpegs)
    rank = [0, 2, 0, 10] * 4
    labels = np.array([fp32[index, r] for index, r in enumerate(rank)])
    rows = ["path,label"]
    for index, (body, label) in enumerate(zip(distinct_jpegs, labels, strict=True)):
        folder = base / "folder" / names[label].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:02d}.jpg").write_bytes(body)
        (base / f"{index:02d}.jpg").write_bytes(body)
        rows.append(f"{index:02d}.jpg,{label if index % 2 else json.dumps(names[label])}")
    (base / "labels.csv").write_text("\n".join(rows) + "\n")

    def accuracy(order: np.ndarray) -> tuple[float, float]:
        top1 = float(np.mean(order[:, 0] == labels))
        top5 = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
        return top1, top5

    assert accuracy(fp32) == (0.5, 0.75)
    return LabelledSet(
        folder=base / "folder",
        csv=base / "labels.csv",
        labels=labels,
        expected={"fp32": accuracy(fp32), "int8": accuracy(int8)},
        agreement=float(np.mean(fp32[:, 0] == int8[:, 0])),
    )


def test_image_folder_and_csv_give_the_zoo_table(
    resnet18_package: Path,
    labelled: LabelledSet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for data in (labelled.folder, labelled.csv):
        report, table = tmp_path / f"{data.name}.json", tmp_path / f"{data.name}.md"
        code = main(
            [str(resnet18_package), str(data), "--json", str(report), "--markdown", str(table)]
        )
        captured = capsys.readouterr()
        assert code == 0, captured.err
        summary = json.loads(report.read_text())
        assert summary["images"] == 16
        rows = {row["source"]: row for row in summary["results"]}
        assert set(rows) == {"fp32", "int8"}
        for precision, (top1, top5) in labelled.expected.items():
            assert rows[precision]["top1"] == pytest.approx(top1)
            assert rows[precision]["top5"] == pytest.approx(top5)
        assert summary["top1_agreement"]["fp32"]["int8"] == pytest.approx(labelled.agreement)
        assert summary["top1_agreement"]["int8"]["int8"] == 1.0
        assert table.read_text() == captured.out
        assert "| fp32 | 50.00% | 75.00% |" in captured.out
        assert "Top-1 agreement" in captured.out
        assert "16/16" in captured.err  # the progress bar


def test_live_server_matches_the_variant_it_serves(
    resnet18_package: Path, labelled: LabelledSet, tmp_path: Path
) -> None:
    report = tmp_path / "server.json"
    app = create_app(Settings(model_dir=resnet18_package, precision="fp32", max_batch_size=8))
    with running_server(app) as url:
        code = main(
            [
                str(resnet18_package),
                str(labelled.csv),
                "--server",
                url,
                "--precision",
                "fp32",
                "--json",
                str(report),
                "--batch-size",
                "5",
                "--no-progress",
            ],
        )
    assert code == 0
    summary = json.loads(report.read_text())
    rows = {row["source"]: row for row in summary["results"]}
    assert set(rows) == {"fp32", "server (fp32)"}
    assert rows["server (fp32)"]["model"]["precision"] == "fp32"
    assert rows["server (fp32)"]["top1"] == pytest.approx(0.5)
    assert rows["server (fp32)"]["top5"] == pytest.approx(0.75)
    assert summary["top1_agreement"]["fp32"]["server (fp32)"] == 1.0


def _csv(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("no-such-data", "does not exist"),
        ("bad-header", "`path,label` header"),
        ("unknown-label", "neither a class name of the package nor an index"),
        ("index-out-of-range", "outside 0..999"),
        ("missing-image", "does not exist"),
        ("not-an-image", "cannot use image"),
        ("no-package", "is not a model package"),
        ("missing-variant", "has no fp16 variant"),
        ("server-down", "cannot reach server"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    resnet18_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    distinct_jpegs: list[bytes],
    case: str,
    expect: str,
) -> None:
    (tmp_path / "a.jpg").write_bytes(distinct_jpegs[0])
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    package, extra = str(resnet18_package), ["--no-progress"]
    data = {
        "no-such-data": tmp_path / "nope",
        "bad-header": _csv(tmp_path, "bad-header", "file,class\na.jpg,1\n"),
        "unknown-label": _csv(tmp_path, "unknown-label", "path,label\na.jpg,no such class\n"),
        "index-out-of-range": _csv(tmp_path, "index-out-of-range", "path,label\na.jpg,1000\n"),
        "missing-image": _csv(tmp_path, "missing-image", "path,label\nzz.jpg,1\n"),
        "not-an-image": _csv(tmp_path, "not-an-image", "path,label\nb.jpg,1\n"),
    }.get(case, _csv(tmp_path, "good", "path,label\na.jpg,tabby\n"))
    if case == "no-package":
        package = str(tmp_path)
    elif case == "missing-variant":
        extra += ["--precision", "fp16"]
    elif case == "server-down":
        extra += ["--server", "http://127.0.0.1:9", "--no-variants", "--timeout", "5"]
    code = main([package, str(data), *extra])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(PREFIX)
    assert expect in lines[0]
    assert captured.out == ""


def test_console_script_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "model_export.evaluate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--server", "--json", "--markdown", "--precision"):
        assert flag in result.stdout
