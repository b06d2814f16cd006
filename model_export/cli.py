"""`resnet-export`: a PyTorch ResNet → a verified ONNX model package."""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_export import archs, graph, mmpretrain, photos, sources, variants, verify
from model_export.errors import ExportError, VerificationFailed
from model_export.package import (
    check_output_path,
    publish,
    staging_directory,
    tool_versions,
)
from model_export.progress import Progress
from service.model_package import (
    VARIANT_FILES,
    ExportRun,
    FailedVariant,
    Manifest,
    Precision,
    Variant,
    Verification,
)

RANDOM_CHECK_IMAGES = 4
# The shipped calibration photos (8) are each used as their centre crop plus 7 random crops,
# flips and colour jitter (brightness, contrast, saturation within ±30%).
CALIBRATION_CROPS_PER_IMAGE = 8
CALIBRATION_JITTER = 0.3
DEFAULT_ARCH = "resnet50"


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
            "  resnet-export --mmpretrain-checkpoint resnetv1d50.pth --out models/v1d50\n"
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
        "--mmpretrain-checkpoint",
        type=Path,
        metavar="PATH",
        help="an MMPretrain (or mmcls 0.x) ResNet checkpoint .pth holding `state_dict` and "
        "`meta`: ResNet, ResNetV1c, ResNetV1d or ResNet_CIFAR of depth 18-152, recognised from "
        "its keys (--arch optional); class names from its meta. MMCV is not needed",
    )
    choice.add_argument(
        "--random-init",
        action="store_true",
        help="seeded random weights: an UNTRAINED model, for offline machines and tests",
    )
    source.add_argument(
        "--arch",
        choices=archs.ALL_ARCHS,
        metavar="ARCH",
        help=f"architecture. torchvision's for --weights and --weights-file: "
        f"{', '.join(archs.TORCHVISION_ARCHS)}; any for --random-init, also MMPretrain's "
        "resnetv1c<depth>, resnetv1d<depth> and resnet<depth>_cifar (depth 18, 34, 50, 101, "
        f"152); checked against the keys for --mmpretrain-checkpoint (default: {DEFAULT_ARCH}, "
        "or what the checkpoint holds)",
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
        "--calibration-method",
        choices=list(variants.CALIBRATION_METHODS),
        default=variants.DEFAULT_CALIBRATION,
        help="how activation ranges are chosen from the calibration images: MinMax, a "
        "percentile of |x|, entropy (KL), or mse (per tensor, the clipping with the least "
        "uint8 squared error) (default: %(default)s; docs/model-package.md has each "
        "method's fidelity and speed)",
    )
    calibration.add_argument(
        "--float-layers",
        choices=variants.FLOAT_LAYERS,
        default=variants.DEFAULT_FLOAT_LAYERS,
        help="what INT8 leaves in float: the stem convolution, the first stage and the "
        "classifier (default: %(default)s; where INT8 loses most on trained weights), only "
        "the stem and the classifier, or nothing",
    )
    calibration.add_argument(
        "--calibration-limit",
        type=positive_int,
        default=256,
        metavar="N",
        help="use at most N images from --calibration-dir (default: %(default)s)",
    )
    output.add_argument(
        "--skip-failed-variants",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write the package without a FP16/INT8 variant that fails its tolerances, and "
        "record its figures under `failed_variants` in the manifest (default: such a failure "
        "fails the export with exit status 3 and nothing written; FP32 always must pass)",
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
    torchvision_only = args.weights is not None or args.weights_file is not None
    if torchvision_only and args.arch is not None and args.arch not in archs.TORCHVISION_ARCHS:
        raise ExportError(
            f"--arch {args.arch} is not a torchvision architecture; --weights and --weights-file "
            f"take {', '.join(archs.TORCHVISION_ARCHS)} (MMPretrain checkpoints: "
            "--mmpretrain-checkpoint)"
        )
    if args.hf_dir is not None and args.arch is not None:
        raise ExportError("--arch does not apply to --hf-dir: config.json says what it is")
    arch = args.arch or DEFAULT_ARCH
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
        with progress.step(f"initialising {arch} with random weights (seed {args.seed})"):
            loaded = sources.load_random_init(arch, args.seed, args.num_classes)
        if labels is not None:
            loaded.labels = labels
        return loaded
    if args.weights_file is not None:
        with progress.step(f"loading {arch} weights from {args.weights_file}"):
            return sources.load_weights_file(arch, args.weights_file, args.num_classes, labels)
    if args.mmpretrain_checkpoint is not None:
        with progress.step(f"loading MMPretrain checkpoint {args.mmpretrain_checkpoint}"):
            return mmpretrain.load_mmpretrain(
                args.mmpretrain_checkpoint, args.arch, args.num_classes, labels
            )
    if args.hf_dir is not None:
        with progress.step(f"loading Hugging Face checkpoint {args.hf_dir}"):
            return sources.load_huggingface(args.hf_dir, args.num_classes)
    with progress.step(f"loading torchvision {arch} weights {args.weights}"):
        return sources.load_torchvision(arch, args.weights, args.num_classes)


def int8_scheme(args: argparse.Namespace) -> variants.Int8Scheme:
    return variants.Int8Scheme(
        method=args.calibration_method,
        float_layers=args.float_layers,
        symmetric_ranges=args.calibration_method == "percentile",
    )


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
) -> tuple[np.ndarray, list[Path], dict[str, object]]:
    if args.calibration_dir is not None:
        files = photos.image_files(args.calibration_dir)[: args.calibration_limit]
        # Enough real images: use their centre crops as the service will see them.
        per_image = 1 if len(files) >= 64 else CALIBRATION_CROPS_PER_IMAGE
        where = str(args.calibration_dir)
    else:
        files = photos.sample_photos(photos.CALIBRATION_PHOTO_NAMES)
        per_image = CALIBRATION_CROPS_PER_IMAGE
        where = "scikit-image sample photos"
    jitter = CALIBRATION_JITTER if per_image > 1 else 0.0
    pixels = photos.augmented_crops(
        files, loaded.preprocessing, per_image, seed=args.seed, jitter=jitter
    )
    return (
        pixels,
        files,
        {
            "source": where,
            "images": len(files),
            "files": [path.name for path in files],
            "crops_per_image": per_image,
            "augmentation": f"random resized crops, flips, colour jitter ±{jitter:.0%}"
            if per_image > 1
            else "none (centre crops)",
        },
    )


def verification_photos(calibration_files: list[Path]) -> list[Path]:
    """The held-out sample photos, less any image that is also a calibration image."""
    calibration = {sources.sha256_file(path) for path in calibration_files}
    held_out = [
        path
        for path in photos.sample_photos(photos.VERIFICATION_PHOTO_NAMES)
        if sources.sha256_file(path) not in calibration
    ]
    if not held_out:
        raise ExportError(
            "every verification photo is also a calibration image; calibrate on other images"
        )
    return held_out


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export(args: argparse.Namespace, progress: Progress) -> Manifest:
    started = time.monotonic()
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
    calibration_files: list[Path] = []
    if Precision.INT8 in precisions:
        with progress.step("preparing INT8 calibration images"):
            calibration_set, calibration_files, calibration_info = calibration_pixels(args, loaded)
    with progress.step("preparing verification photos (held out from calibration)"):
        held_out = verification_photos(calibration_files)
        photo_names = [path.name for path in held_out]
        input_sets = [
            verify.InputSet("photos", photos.preprocess_files(held_out, spec)),
            verify.InputSet("random", photos.random_pixels(RANDOM_CHECK_IMAGES, spec.crop, 1234)),
        ]
    inputs, outputs = graph.io_specs(spec, loaded.num_classes, loaded.embedding_dim)
    with staging_directory(out) as staging:
        fp32_path = staging / VARIANT_FILES[Precision.FP32]
        with progress.step("exporting to ONNX and running onnx.checker"):
            graph.export_onnx(graph.ServingResNet(loaded), fp32_path, spec.crop, args.opset)
        built: dict[Precision, Variant] = {}
        failed: dict[Precision, FailedVariant] = {}
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
                    settings = variants.to_int8(
                        fp32_path, path, calibration_set, graph.INPUT_NAME, spec, int8_scheme(args)
                    )
                    calibration = {**calibration_info, **settings}
                notes.append("static QDQ int8; for CPUs with VNNI or AMX")
            candidate: verify.Runner
            provider = verify.CPU
            if precision is Precision.FP32:
                candidate, reference, reference_name = (
                    fp32_runner,
                    torch_runner(loaded),
                    "pytorch",
                )
            else:
                opener = verify.fp16_runner if precision is Precision.FP16 else verify.onnx_runner
                runner = opener(path, args.threads)
                candidate, provider = runner, runner.provider
                reference, reference_name = fp32_runner, "fp32-onnx"
            where = f" on {provider}" if precision is Precision.FP16 else ""
            with progress.step(f"verifying {precision}{where} against {reference_name}"):
                report = verify.verify(
                    candidate,
                    reference,
                    input_sets,
                    precision,
                    reference_name,
                    photo_names,
                    provider,
                )
            _print_report(precision, report, progress)
            if not report.passed:
                reason = (
                    f"{precision} graph is outside tolerance against {reference_name}: "
                    f"{verify.failure_summary(report)}"
                )
                if precision is Precision.FP32 or not args.skip_failed_variants:
                    raise VerificationFailed(reason)
                progress.warn(f"{reason}; left out of the package (--skip-failed-variants)")
                failed[precision] = FailedVariant(
                    precision=precision, reason=reason, verification=report
                )
                path.unlink()
                continue
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
            failed_variants=failed,
            tools=tool_versions(
                "resnet-serve",
                "torch",
                "torchvision",
                "transformers",
                "onnx",
                "onnxscript",
                "onnxruntime",
                "onnxruntime-gpu",  # whichever ONNX Runtime build is installed
            ),
            export=ExportRun(
                peak_rss_bytes=peak_rss_bytes(), seconds=round(time.monotonic() - started, 1)
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
    skipped = "".join(
        f"; {precision} FAILED its tolerances and was left out"
        for precision in manifest.failed_variants
    )
    assert manifest.export is not None
    print(
        f"{args.out}: {manifest.arch}, {trained}, verified variants: {variants_built}{skipped}; "
        f"export peak RSS {manifest.export.peak_rss_bytes / 2**30:.2f} GiB"
    )
    return 0
