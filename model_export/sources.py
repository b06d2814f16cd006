"""Where a model comes from: torchvision weights, a local state dict, a Hugging Face
checkpoint directory, or seeded random initialisation.

Each loader returns a `LoadedModel`: the PyTorch module split into the pieces the
serving graph is built from (`features`, `classifier`), a `reference` forward that runs
the *unmodified* model the way its authors do (so parity checks the restructuring too),
and the metadata the manifest records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from model_export import archs
from model_export.archs import ALL_ARCHS, TORCHVISION_ARCHS
from model_export.errors import ExportError
from service.model_package import Interpolation, PreprocessSpec, Source

IMAGENET_CLASSES = 1000

# Hugging Face's ResNetConfig (layer_type, depths) → the torchvision name of the same network.
_HF_ARCHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
# PIL resample codes, as Hugging Face preprocessor configs store them.
_PIL_RESAMPLE = {
    0: Interpolation.NEAREST,
    1: Interpolation.LANCZOS,
    2: Interpolation.BILINEAR,
    3: Interpolation.BICUBIC,
}
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

Reference = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoadedModel:
    arch: str
    features: nn.Module  # normalised NCHW float → final feature map [N, C, h, w]
    classifier: nn.Module  # pooled embedding [N, C] → logits [N, num_classes]
    reference: Reference  # the unmodified model: normalised NCHW → (logits, embedding)
    num_classes: int
    embedding_dim: int
    labels: list[str]
    preprocessing: PreprocessSpec
    source: Source
    trained: bool


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imagenet_labels() -> list[str]:
    text = resources.files("model_export").joinpath("data/imagenet_labels.json").read_text()
    labels = json.loads(text)
    assert len(labels) == IMAGENET_CLASSES
    return labels


def load_labels_file(path: Path, num_classes: int) -> list[str]:
    """A JSON list of names, or a text file with one name per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".json":
        try:
            labels = json.loads(text)
        except ValueError as exc:
            raise ExportError(f"labels file {path} is not valid JSON: {exc}") from exc
        if not isinstance(labels, list):
            raise ExportError(f"labels file {path} must hold a JSON list of class names")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ExportError(
            f"labels file {path} has {len(labels)} names but the model has {num_classes} classes"
        )
    return [str(label) for label in labels]


def default_labels(num_classes: int) -> list[str]:
    if num_classes == IMAGENET_CLASSES:
        return imagenet_labels()
    return [f"class_{index}" for index in range(num_classes)]


def _check_num_classes(found: int, requested: int | None, where: str) -> int:
    if requested is not None and requested != found:
        raise ExportError(
            f"num_classes mismatch: {where} has {found} classes but --num-classes is {requested}"
        )
    return found


# ---------------------------------------------------------------- torchvision


def _torchvision_module(arch: str, num_classes: int, weights: Any = None) -> nn.Module:
    import torchvision

    if arch not in TORCHVISION_ARCHS:
        raise ExportError(f"unknown arch {arch!r}; choose one of: {', '.join(TORCHVISION_ARCHS)}")
    kwargs = {} if weights is not None else {"num_classes": num_classes}
    return torchvision.models.get_model(arch, weights=weights, **kwargs).eval()


class _TimmFeatures(nn.Module):
    """timm's `forward_features`: the stem and the four stages, before pooling."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model  # timm's ResNet; torch's Module typing hides the method
        return cast(torch.Tensor, model.forward_features(pixels))


def from_module(
    model: nn.Module,
    arch: str,
    labels: list[str],
    preprocessing: PreprocessSpec,
    source: Source,
    trained: bool,
) -> LoadedModel:
    """Split a torchvision-style (or timm) ResNet into features and classifier."""
    model = model.eval()
    if hasattr(model, "forward_features"):  # timm
        features: nn.Module = _TimmFeatures(model)
    else:
        stem_and_stages = (
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
        )
        features = nn.Sequential(*(model.get_submodule(name) for name in stem_and_stages))
    classifier = cast(nn.Linear, model.get_submodule("fc"))
    return LoadedModel(
        arch=arch,
        features=features,
        classifier=classifier,
        reference=_forward_capturing_classifier_input(model, classifier),
        num_classes=classifier.out_features,
        embedding_dim=classifier.in_features,
        labels=labels,
        preprocessing=preprocessing,
        source=source,
        trained=trained,
    )


def _forward_capturing_classifier_input(model: nn.Module, classifier: nn.Module) -> Reference:
    """The model's own forward, with the classifier's input captured as the embedding."""

    def reference(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = classifier.register_forward_hook(
            lambda _module, inputs, _output: captured.append(inputs[0])
        )
        try:
            output = model(pixels)
        finally:
            handle.remove()
        logits = output if isinstance(output, torch.Tensor) else output.logits
        return logits, captured[0].flatten(1)

    return reference


def load_torchvision(arch: str, weights_name: str, num_classes: int | None) -> LoadedModel:
    """Pretrained torchvision weights, through torchvision's own download and cache."""
    import torchvision

    if arch not in TORCHVISION_ARCHS:
        raise ExportError(f"unknown arch {arch!r}; choose one of: {', '.join(TORCHVISION_ARCHS)}")
    weights_enum = torchvision.models.get_model_weights(arch)
    try:
        weights = weights_enum[weights_name] if weights_name != "DEFAULT" else weights_enum.DEFAULT
    except KeyError as exc:
        known = ", ".join(["DEFAULT", *(member.name for member in weights_enum)])
        raise ExportError(
            f"{arch} has no weights {weights_name!r}; choose one of: {known}"
        ) from exc
    categories = list(weights.meta["categories"])
    _check_num_classes(len(categories), num_classes, f"torchvision weights {weights}")
    try:
        model = _torchvision_module(arch, len(categories), weights=weights)
    except (OSError, RuntimeError) as exc:
        raise ExportError(
            f"cannot download or load torchvision weights {weights} from {weights.url}: {exc} "
            "(without internet, use --weights-file or --random-init)"
        ) from exc
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    transform = weights.transforms()
    preprocessing = PreprocessSpec(
        resize=int(transform.resize_size[0]),
        crop=int(transform.crop_size[0]),
        interpolation=Interpolation(transform.interpolation.value),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )
    source = Source(
        kind="torchvision",
        weights=str(weights),
        path=weights.url,
        sha256=sha256_file(checkpoint) if checkpoint.is_file() else None,
    )
    return from_module(model, arch, categories, preprocessing, source, trained=True)


def load_random_init(arch: str, seed: int, num_classes: int | None) -> LoadedModel:
    """Seeded, untrained weights: the same seed gives the same model on every machine."""
    if arch not in ALL_ARCHS:
        raise ExportError(f"unknown arch {arch!r}; choose one of: {', '.join(ALL_ARCHS)}")
    classes = num_classes or IMAGENET_CLASSES
    torch.manual_seed(seed)
    model = archs.build(arch, classes)
    source = Source(kind="random-init", seed=seed)
    return from_module(
        model,
        arch,
        default_labels(classes),
        archs.default_preprocessing(arch, classes),
        source,
        trained=False,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.pth`/`.pt` (tensors only, never pickled code) or `.safetensors`."""
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot read weights file {path}: {reason}") from exc
    # Training checkpoints often wrap the weights; DataParallel prefixes every key.
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ExportError(f"weights file {path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights_file(
    arch: str, path: Path, num_classes: int | None, labels: list[str] | None
) -> LoadedModel:
    """A local state dict for a torchvision architecture, checked key by key."""
    state = read_state_dict(path)
    if arch not in TORCHVISION_ARCHS:
        raise ExportError(f"unknown arch {arch!r}; choose one of: {', '.join(TORCHVISION_ARCHS)}")
    classifier_weight = state.get("fc.weight")
    found = int(classifier_weight.shape[0]) if classifier_weight is not None else None
    classes = (
        _check_num_classes(found, num_classes, f"weights file {path}")
        if found is not None
        else (num_classes or IMAGENET_CLASSES)
    )
    model = _torchvision_module(arch, classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"weights file {path} does not match {arch}: "
            f"{len(missing)} missing keys {_preview(missing)}, "
            f"{len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    wrong_shapes = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong_shapes:
        raise ExportError(
            f"weights file {path} does not match {arch}: shape mismatch {_preview(wrong_shapes)}"
        )
    model.load_state_dict(state, strict=True)
    source = Source(kind="weights-file", path=str(path), sha256=sha256_file(path))
    return from_module(
        model, arch, labels or default_labels(classes), PreprocessSpec(), source, trained=True
    )


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


# ---------------------------------------------------------------- Hugging Face


class _HuggingFaceFeatures(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixels, return_dict=True).last_hidden_state


def hf_preprocessing(directory: Path) -> PreprocessSpec:
    """Resize, crop, interpolation and normalisation from `preprocessor_config.json`."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessSpec()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    size = config.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge") or size.get("height") or 224
    crop_pct = config.get("crop_pct")
    # ConvNeXT-style processors (microsoft/resnet-50): resize to size/crop_pct, crop to size.
    if crop_pct and int(size) < 384:
        resize, crop = int(int(size) / float(crop_pct)), int(size)
    else:
        crop_size = config.get("crop_size", size)
        if isinstance(crop_size, Mapping):
            crop_size = crop_size.get("height", size)
        resize, crop = int(size), int(crop_size)
    return PreprocessSpec(
        resize=resize,
        crop=crop,
        interpolation=_PIL_RESAMPLE.get(int(config.get("resample", 2)), Interpolation.BILINEAR),
        mean=tuple(config.get("image_mean", (0.485, 0.456, 0.406))),
        std=tuple(config.get("image_std", (0.229, 0.224, 0.225))),
    )


def load_huggingface(directory: Path, num_classes: int | None) -> LoadedModel:
    """A local `transformers` ResNet checkpoint in the layout of `microsoft/resnet-50`."""
    if not directory.is_dir():
        raise ExportError(f"Hugging Face directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} has no config.json; it is not a Hugging Face checkpoint")
    weight_files = [directory / name for name in _HF_WEIGHT_FILES if (directory / name).is_file()]
    if not weight_files:
        raise ExportError(
            f"{directory} has no weights: expected one of {', '.join(_HF_WEIGHT_FILES)}"
        )
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.utils import logging as hf_logging

    try:
        config: Any = ResNetConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {directory / 'config.json'}: {exc}") from exc
    if config.model_type != "resnet":
        raise ExportError(f"{directory} holds a {config.model_type!r} model, not a ResNet")
    found = int(config.num_labels)
    _check_num_classes(found, num_classes, f"{directory / 'config.json'}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading info is checked below, not printed
    try:
        model, info = cast(
            tuple[Any, dict[str, list[Any]]],
            ResNetForImageClassification.from_pretrained(
                directory, local_files_only=True, output_loading_info=True
            ),
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load weights from {weight_files[0]}: {reason}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = [str(item) for item in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise ExportError(
            f"weights in {weight_files[0]} do not match config.json: "
            f"{len(missing)} missing keys {_preview(missing)}, "
            f"{len(unexpected)} unexpected keys {_preview(unexpected)}, "
            f"{len(mismatched)} shape mismatches {_preview(mismatched)}"
        )
    model = model.eval().float()
    id2label = config.id2label or {}
    labels = [str(id2label.get(index, f"class_{index}")) for index in range(found)]
    if found == IMAGENET_CLASSES and all(label.startswith("LABEL_") for label in labels):
        labels = imagenet_labels()
    arch = _HF_ARCHS.get((config.layer_type, tuple(config.depths)), "resnet-custom")
    linear = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else None
    if not isinstance(linear, nn.Linear):
        raise ExportError(f"{directory} has no classification head (num_labels = {found})")
    return LoadedModel(
        arch=arch,
        features=_HuggingFaceFeatures(model.resnet),
        classifier=model.classifier,
        reference=_forward_capturing_classifier_input(model, model.classifier),
        num_classes=found,
        embedding_dim=int(config.hidden_sizes[-1]),
        labels=labels,
        preprocessing=hf_preprocessing(directory),
        source=Source(kind="huggingface", path=str(directory), sha256=sha256_file(weight_files[0])),
        trained=True,
    )
