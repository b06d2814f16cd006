"""`resnet-eval`: the model zoos' accuracy table for a model package.

Top-1 and top-5 accuracy of each variant of a package (ONNX Runtime, the service's own
preprocessing) on a labelled image set, the top-1 agreement between every pair of them,
and the same for a live server's `POST /predict` (through httpx, as a client would call
it). Writes a Markdown table to stdout, and JSON and Markdown files on request.

The labelled set is an ImageFolder directory (one sub-folder per class, named by the
package's class name or class index; other names are taken in sorted order, torchvision's
ImageFolder convention, when there is one per class) or a CSV file with a `path,label`
header (paths relative to the CSV file; a label is a class index or a class name).

Needs onnxruntime, numpy, Pillow, httpx and tqdm (`pip install 'resnet-serve[cpu,eval]'`);
never torch.
"""

from __future__ import annotations

import argparse
import csv
import json
import mimetypes
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ImageTooLarge, InvalidImage
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage, PackageError, Precision

PROG = "resnet-eval"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
TOP_K = 5
MAX_PIXELS = 200_000_000
EXIT_BAD_INPUT = 2


class EvalError(Exception):
    """Bad input: reported as one `resnet-eval: error:` line, exit status 2."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Result:
    """One source's predictions: top-5 class indices per image, in sample order."""

    name: str
    top5: np.ndarray  # [N, 5] int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, labels: np.ndarray) -> tuple[float, float]:
        top1 = float(np.mean(self.top5[:, 0] == labels))
        top5 = float(np.mean(np.any(self.top5 == labels[:, None], axis=1)))
        return top1, top5


# ------------------------------------------------------------------ the labelled set


def _class_index(label: str, labels: list[str], where: str) -> int:
    names = {name: index for index, name in enumerate(labels)}
    if label in names:
        return names[label]
    if label.strip().lstrip("-").isdigit():
        index = int(label)
        if 0 <= index < len(labels):
            return index
        raise EvalError(f"{where}: class index {index} is outside 0..{len(labels) - 1}")
    raise EvalError(f"{where}: {label!r} is neither a class name of the package nor an index")


def read_image_folder(directory: Path, labels: list[str]) -> list[Sample]:
    classes = sorted(path for path in directory.iterdir() if path.is_dir())
    if not classes:
        raise EvalError(f"{directory} has no class sub-folders (ImageFolder layout)")
    names = [path.name for path in classes]
    known = set(labels)
    if all(name in known for name in names) or all(name.isdigit() for name in names):
        indices = [_class_index(name, labels, f"{directory}/{name}") for name in names]
    elif len(names) == len(labels):
        indices = list(range(len(names)))  # torchvision ImageFolder: sorted folder order
    else:
        raise EvalError(
            f"the class folders in {directory} ({len(names)}) are neither the package's class "
            f"names nor indices, nor one per class ({len(labels)}): e.g. {names[0]!r}"
        )
    samples = [
        Sample(path, index)
        for folder, index in zip(classes, indices, strict=True)
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not samples:
        raise EvalError(f"{directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples


def read_csv(path: Path, labels: list[str]) -> list[Sample]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalError(f"cannot read {path}: {exc}") from exc
    if not rows or set(header) != {"path", "label"}:
        raise EvalError(f"{path} must be a CSV with a `path,label` header and at least one row")
    samples = []
    for number, row in enumerate(rows, start=2):
        image = path.parent / (row["path"] or "")
        if not image.is_file():
            raise EvalError(f"{path} line {number}: image {image} does not exist")
        samples.append(
            Sample(image, _class_index(row["label"] or "", labels, f"{path} line {number}"))
        )
    return samples


def read_samples(data: Path, labels: list[str], limit: int | None) -> list[Sample]:
    if data.is_dir():
        samples = read_image_folder(data, labels)
    elif data.is_file() and data.suffix.lower() == ".csv":
        samples = read_csv(data, labels)
    else:
        raise EvalError(f"{data} is neither an ImageFolder directory nor a .csv file")
    return samples[:limit] if limit else samples


# ----------------------------------------------------------------------- the sources


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _top5(logits: np.ndarray) -> np.ndarray:
    k = min(TOP_K, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def evaluate_variant(
    package: ModelPackage,
    precision: Precision,
    samples: list[Sample],
    batch_size: int,
    threads: int,
    progress: Callable[[int], None],
) -> Result:
    import onnxruntime as ort

    path = package.variant_path(precision)
    assert path is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    preprocess = ImagePreprocessor(package.manifest.preprocessing, MAX_PIXELS)
    predictions = []
    started = time.perf_counter()
    for batch in _batches(samples, batch_size):
        pixels = np.stack([_decode(preprocess, sample.path) for sample in batch])
        (logits,) = session.run(["logits"], {package.manifest.input_name: pixels})
        predictions.append(_top5(logits))
        progress(len(batch))
    return Result(str(precision), np.concatenate(predictions), time.perf_counter() - started)


def _decode(preprocess: ImagePreprocessor, path: Path) -> np.ndarray:
    try:
        return preprocess(path.read_bytes())
    except (InvalidImage, ImageTooLarge) as exc:
        raise EvalError(f"cannot use image {path}: {exc.message}") from exc
    except OSError as exc:
        raise EvalError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def evaluate_server(
    url: str,
    samples: list[Sample],
    batch_size: int,
    timeout: float,
    progress: Callable[[int], None],
) -> Result:
    """`POST /predict` with up to `batch_size` images per multipart request."""
    import httpx

    predictions: list[list[int]] = []
    model: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            for batch in _batches(samples, min(batch_size, 32)):
                files = [
                    (
                        "files",
                        (
                            sample.path.name,
                            sample.path.read_bytes(),
                            mimetypes.guess_type(sample.path.name)[0] or "application/octet-stream",
                        ),
                    )
                    for sample in batch
                ]
                response = client.post("/predict", params={"top_k": TOP_K}, files=files)
                if response.status_code != 200:
                    raise EvalError(
                        f"server {url} answered {response.status_code} to /predict: "
                        f"{response.text[:200]}"
                    )
                body = response.json()
                model = body.get("model", model)
                predictions += [[p["index"] for p in image] for image in body["predictions"]]
                progress(len(batch))
    except httpx.HTTPError as exc:
        raise EvalError(f"cannot reach server {url}: {type(exc).__name__}: {exc}") from exc
    name = f"server ({model.get('precision', '?')})"
    return Result(
        name, np.array(predictions), time.perf_counter() - started, {"url": url, "model": model}
    )


# ------------------------------------------------------------------------ the report


def report(
    package: ModelPackage, data: Path, samples: list[Sample], results: list[Result]
) -> dict[str, Any]:
    labels = np.array([sample.label for sample in samples])
    rows = []
    for result in results:
        top1, top5 = result.accuracy(labels)
        rows.append(
            {
                "source": result.name,
                "images": len(samples),
                "top1": top1,
                "top5": top5,
                "images_per_s": len(samples) / result.seconds if result.seconds else None,
                **result.details,
            }
        )
    agreement = {
        a.name: {b.name: float(np.mean(a.top5[:, 0] == b.top5[:, 0])) for b in results}
        for a in results
    }
    manifest = package.manifest
    return {
        "package": str(package.directory),
        "model": {"name": manifest.name, "version": manifest.version, "arch": manifest.arch},
        "trained": manifest.trained,
        "data": str(data),
        "images": len(samples),
        "classes_present": len(set(labels.tolist())),
        "results": rows,
        "top1_agreement": agreement,
    }


def markdown(summary: dict[str, Any]) -> str:
    names = [row["source"] for row in summary["results"]]
    lines = [
        f"Accuracy of `{summary['model']['name']}` ({summary['model']['arch']}"
        f"{'' if summary['trained'] else ', UNTRAINED'}) on {summary['images']} images "
        f"of {summary['data']}",
        "",
        "| source | top-1 | top-5 | images/s |",
        "|---|---|---|---|",
    ]
    for row in summary["results"]:
        speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] else "–"
        lines.append(f"| {row['source']} | {row['top1']:.2%} | {row['top5']:.2%} | {speed} |")
    if len(names) > 1:
        lines += ["", "Top-1 agreement", "", "| | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for a in names:
            cells = " | ".join(f"{summary['top1_agreement'][a][b]:.2%}" for b in names)
            lines.append(f"| {a} | {cells} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Top-1/top-5 accuracy of a model package's variants, and of a live "
        "resnet-serve, on a labelled image set; prints a Markdown table.",
        epilog="Examples:\n"
        "  resnet-eval models/resnet50 ./imagenet-val           # ImageFolder layout\n"
        "  resnet-eval models/resnet50 labels.csv --server http://127.0.0.1:8000 \\\n"
        "      --json report.json --markdown report.md\n"
        "\nExit status: 0 done, 2 bad input (one `resnet-eval: error:` line).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("package", type=Path, help="model package directory (resnet-export --out)")
    parser.add_argument(
        "data", type=Path, help="labelled images: an ImageFolder directory or a path,label CSV"
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=[precision.value for precision in Precision],
        help="variants to evaluate; repeatable (default: every variant in the package; "
        "fp16 runs on the CPU here, slowly)",
    )
    parser.add_argument(
        "--server", metavar="URL", help="also evaluate a live resnet-serve at URL via /predict"
    )
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="evaluate only --server, not the package's variants locally",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the Markdown table")
    parser.add_argument("--batch-size", type=_positive, default=16, help="(default: %(default)s)")
    parser.add_argument("--limit", type=_positive, metavar="N", help="use the first N images")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per server request")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar on stderr (default: on)",
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    try:
        package = ModelPackage.load(args.package)
    except PackageError as exc:
        raise EvalError(str(exc)) from exc
    if not args.data.exists():
        raise EvalError(f"labelled data {args.data} does not exist")
    samples = read_samples(args.data, package.labels, args.limit)
    available = list(package.manifest.variants)
    wanted = [Precision(p) for p in dict.fromkeys(args.precision or [])] or available
    missing = [str(p) for p in wanted if p not in available]
    if missing:
        raise EvalError(
            f"{args.package} has no {', '.join(missing)} variant "
            f"(it has {', '.join(map(str, available))})"
        )
    if args.no_variants:
        if not args.server:
            raise EvalError("--no-variants needs --server")
        wanted = []
    results = []
    sources = [str(p) for p in wanted] + (["server"] if args.server else [])
    for name in sources:
        with tqdm(
            total=len(samples), desc=name, unit="img", disable=not args.progress, file=sys.stderr
        ) as bar:
            if name == "server":
                results.append(
                    evaluate_server(args.server, samples, args.batch_size, args.timeout, bar.update)
                )
            else:
                results.append(
                    evaluate_variant(
                        package, Precision(name), samples, args.batch_size, args.threads, bar.update
                    )
                )
    return report(package, args.data, samples, results)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
        table = markdown(summary)
        try:
            if args.json is not None:
                args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            if args.markdown is not None:
                args.markdown.write_text(table, encoding="utf-8")
        except OSError as exc:
            raise EvalError(f"cannot write the report: {exc.strerror or exc}") from exc
    except EvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
