"""`resnet-export`: a PyTorch ResNet → a verified ONNX model package."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_export import graph, photos, sources, variants, verify
from model_export.errors import ExportError, VerificationFailed
from model_export.package import (
    check_output_path,
    publish,
    staging_directory,
    tool_versions,
)
from model_export.progress import Progress
from service.model_package import VARIANT_FILES, Manifest, Precision, Variant, Verification

RANDOM_CHECK_IMAGES = 4
CALIBRATION_CROPS_PER_IMAGE = 4


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-export",
        description=(
            "Export a PyTorch ResNet to a verified ONNX model package for resnet-serve: "
            "one graph taking uint8 RGB pixels [N, 224, 224, 3] (normalisation fused in) and "
            "returning `logits` and `embedding`, checked against PyTorch on real photos, "
            "with optional FP16 and INT8 variants and a manifest.json describing it all."
        ),
        epilog=(
            "Examples:\n"
            "  resnet-export --arch resnet50 --weights IMAGENET1K_V2 --out models/resnet50\n"
            "  resnet-export --hf-dir ./resnet-50 --precision int8 --out models/hf-resnet50\n"
            "  resnet-export --random-init --seed 0 --out models/resnet50   # offline, untrained\n"
            "\nExit status: 0 exported and verified, 2 bad input, 3 verification failed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source (choose one)")
    choice = source.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--weights",
        metavar="NAME",
        help="torchvision pretrained weights for --arch: IMAGENET1K_V1, IMAGENET1K_V2 or "
        "DEFAULT; downloaded through torchvision's cache (needs internet the first time)",
    )
    choice.add_argument(
        "--weights-file",
        type=Path,
        metavar="PATH",
        help="a state dict for --arch saved as .pth/.pt (torch.save) or .safetensors",
    )
    choice.add_argument(
        "--hf-dir",
        type=Path,
        metavar="PATH",
        help="a local Hugging Face transformers ResNet checkpoint directory (the layout of "
        "microsoft/resnet-50: config.json, model.safetensors or pytorch_model.bin, "
        "optional preprocessor_config.json)",
    )
    choice.add_argument(
        "--random-init",
        action="store_true",
        help="seeded random weights: an UNTRAINED model, for offline machines and tests",
    )
    source.add_argument(
        "--arch",
        default="resnet50",
        choices=sources.TORCHVISION_ARCHS,
        help="torchvision architecture for --weights, --weights-file and --random-init "
        "(default: %(default)s)",
    )
    source.add_argument(
        "--seed", type=int, default=0, help="seed for --random-init (default: %(default)s)"
    )
    source.add_argument(
        "--num-classes",
        type=positive_int,
        metavar="N",
        help="number of classes; checked against the weights (default: what the weights "
        "say, 1000 for --random-init)",
    )
    source.add_argument(
        "--labels",
        type=Path,
        metavar="PATH",
        help="class names for --weights-file or --random-init: a JSON list or one name per line "
        "(default: ImageNet-1k names for 1000 classes, class_<i> otherwise)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="package directory to create"
    )
    output.add_argument(
        "--force",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace an existing package at --out (atomically, only once the new one is verified)",
    )
    output.add_argument(
        "--precision",
        action="append",
        choices=[precision.value for precision in Precision],
        metavar="{fp32,fp16,int8}",
        help="precision variants to build; repeatable. FP32 is always built (it is the "
        "reference): fp16 for GPUs, int8 for CPUs with VNNI/AMX",
    )
    output.add_argument("--name", help="model name in the manifest (default: the arch)")
    output.add_argument(
        "--model-version", default="1", help="model version in the manifest (default: %(default)s)"
    )
    output.add_argument(
        "--opset", type=int, default=graph.DEFAULT_OPSET, help="ONNX opset (default: %(default)s)"
    )
    calibration = parser.add_argument_group("INT8 calibration")
    calibration.add_argument(
        "--calibration-dir",
        type=Path,
        metavar="DIR",
        help="photos to calibrate INT8 activation ranges on, searched recursively; use a few "
        "hundred images like your traffic (default: the photos scikit-image ships)",
    )
    calibration.add_argument(
        "--calibration-limit",
        type=positive_int,
        default=256,
        metavar="N",
        help="use at most N images from --calibration-dir (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        help="CPU threads for PyTorch and ONNX Runtime during verification (0: all cores)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only warnings, errors and the result"
    )
    return parser


def load_model(args: argparse.Namespace, progress: Progress) -> sources.LoadedModel:
    labels = None
    if args.labels is not None and (args.hf_dir is not None or args.weights is not None):
        raise ExportError(
            "--labels applies to --weights-file and --random-init; Hugging Face checkpoints "
            "and torchvision weights carry their own class names"
        )
    if args.labels is not None:
        if args.num_classes is None:
            raise ExportError("--labels needs --num-classes, so the two can be checked")
        labels = sources.load_labels_file(args.labels, args.num_classes)
    if args.random_init:
        with progress.step(f"initialising {args.arch} with random weights (seed {args.seed})"):
            loaded = sources.load_random_init(args.arch, args.seed, args.num_classes)
        if labels is not None:
            loaded.labels = labels
        return loaded
    if args.weights_file is not None:
        with progress.step(f"loading {args.arch} weights from {args.weights_file}"):
            return sources.load_weights_file(args.arch, args.weights_file, args.num_classes, labels)
    if args.hf_dir is not None:
        with progress.step(f"loading Hugging Face checkpoint {args.hf_dir}"):
            return sources.load_huggingface(args.hf_dir, args.num_classes)
    with progress.step(f"loading torchvision {args.arch} weights {args.weights}"):
        return sources.load_torchvision(args.arch, args.weights, args.num_classes)


def torch_runner(loaded: sources.LoadedModel) -> verify.Runner:
    """The PyTorch reference on the same uint8 pixels, normalised by torchvision itself."""
    import torch
    from torchvision.transforms.functional import normalize

    spec = loaded.preprocessing

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        with torch.no_grad():
            logits, embedding = loaded.reference(normalize(tensor, spec.mean, spec.std))
        return logits.numpy(), embedding.numpy()

    return run


def calibration_pixels(
    args: argparse.Namespace, loaded: sources.LoadedModel
) -> tuple[np.ndarray, dict[str, object]]:
    if args.calibration_dir is not None:
        files = photos.image_files(args.calibration_dir)[: args.calibration_limit]
        # Enough real images: use their centre crops as the service will see them.
        per_image = 1 if len(files) >= 64 else CALIBRATION_CROPS_PER_IMAGE
        where = str(args.calibration_dir)
    else:
        files = photos.sample_photos()
        per_image = CALIBRATION_CROPS_PER_IMAGE
        where = "scikit-image sample photos"
    pixels = photos.augmented_crops(files, loaded.preprocessing, per_image, seed=args.seed)
    return pixels, {"source": where, "images": len(files), "crops_per_image": per_image}


def export(args: argparse.Namespace, progress: Progress) -> Manifest:
    out: Path = args.out
    check_output_path(out, args.force)
    if args.calibration_dir is not None:
        photos.image_files(args.calibration_dir)  # an empty folder fails now, not after export
    precisions = [Precision.FP32] + [
        Precision(p) for p in dict.fromkeys(args.precision or []) if p != Precision.FP32
    ]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args, progress)
    if not loaded.trained:
        progress.warn(
            "this model has RANDOM, UNTRAINED weights: its predictions are meaningless. "
            "The manifest records trained=false and resnet-serve will say so."
        )
    spec = loaded.preprocessing
    with progress.step("preparing verification photos"):
        input_sets = [
            verify.InputSet("photos", photos.preprocess_files(photos.sample_photos(), spec)),
            verify.InputSet("random", photos.random_pixels(RANDOM_CHECK_IMAGES, spec.crop, 1234)),
        ]
    inputs, outputs = graph.io_specs(spec, loaded.num_classes, loaded.embedding_dim)
    with staging_directory(out) as staging:
        fp32_path = staging / VARIANT_FILES[Precision.FP32]
        with progress.step("exporting to ONNX and running onnx.checker"):
            graph.export_onnx(graph.ServingResNet(loaded), fp32_path, spec.crop, args.opset)
        built: dict[Precision, Variant] = {}
        calibration: dict[str, object] | None = None
        fp32_runner = verify.onnx_runner(fp32_path, args.threads)
        for precision in precisions:
            path = staging / VARIANT_FILES[precision]
            notes: list[str] = []
            if precision is Precision.FP16:
                with progress.step("converting to FP16"):
                    variants.to_fp16(fp32_path, path)
                notes.append("float16 weights and activations; for GPUs (CUDA)")
            elif precision is Precision.INT8:
                with progress.step("calibrating and quantising to INT8"):
                    pixels, calibration = calibration_pixels(args, loaded)
                    settings = variants.to_int8(fp32_path, path, pixels, graph.INPUT_NAME)
                    calibration = {**calibration, **settings}
                notes.append("static QDQ int8; for CPUs with VNNI or AMX")
            if precision is Precision.FP32:
                candidate, reference, reference_name = (
                    fp32_runner,
                    torch_runner(loaded),
                    "pytorch",
                )
            else:
                candidate = verify.onnx_runner(path, args.threads)
                reference, reference_name = fp32_runner, "fp32-onnx"
            with progress.step(f"verifying {precision} against {reference_name}"):
                report = verify.verify(candidate, reference, input_sets, precision, reference_name)
            _print_report(precision, report, progress)
            if not report.passed:
                raise VerificationFailed(
                    f"{precision} graph is outside tolerance against {reference_name}: "
                    f"{verify.failure_summary(report)}"
                )
            built[precision] = Variant(
                precision=precision,
                file=path.name,
                sha256=sources.sha256_file(path),
                bytes=path.stat().st_size,
                verification=report,
                notes=notes,
            )
        manifest = Manifest(
            name=args.name or loaded.arch,
            version=args.model_version,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            arch=loaded.arch,
            trained=loaded.trained,
            source=loaded.source,
            num_classes=loaded.num_classes,
            embedding_dim=loaded.embedding_dim,
            opset=graph.graph_opset(fp32_path),
            inputs=inputs,
            outputs=outputs,
            preprocessing=spec,
            variants=built,
            calibration=calibration,
            tools=tool_versions(
                "resnet-serve",
                "torch",
                "torchvision",
                "transformers",
                "onnx",
                "onnxscript",
                "onnxruntime",
            ),
        )
        publish(staging, out, manifest, loaded.labels)
    return manifest


def _print_report(precision: Precision, report: Verification, progress: Progress) -> None:
    for check in report.checks:
        progress.info(
            f"  {precision} {check.inputs:6s} batch {check.batch_size}: "
            f"logits rel diff {check.logits_max_rel_diff:.2e}, "
            f"embedding cosine {check.embedding_min_cosine:.6f}, "
            f"top-1 {check.top1_agreement:.0%}, top-5 {check.top5_overlap:.0%}"
            f"{'' if check.passed else '  <-- OUT OF TOLERANCE'}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(quiet=args.quiet)
    try:
        manifest = export(args, progress)
    except ExportError as exc:
        print(f"resnet-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("resnet-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    variants_built = ", ".join(
        f"{precision} ({variant.file})" for precision, variant in manifest.variants.items()
    )
    trained = "trained" if manifest.trained else "UNTRAINED (random init)"
    print(f"{args.out}: {manifest.arch}, {trained}, verified variants: {variants_built}")
    return 0
