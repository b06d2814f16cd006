"""MMPretrain (and mmcls 0.x) checkpoints, read without MMCV.

A checkpoint is a `.pth` holding `state_dict` (`backbone.*`, `head.fc.*`) and `meta`. The
architecture is recognised from the keys:

- depth: blocks per stage (`backbone.layer<i>.<j>.`) and the block type (`conv3` → bottleneck);
- ResNetV1c / V1d: a deep stem, `backbone.stem.{0,1,2}.{conv,bn}` (three ConvModules);
- ResNetV1d: the average-pool shortcut, `backbone.layer<i>.0.downsample.{1,2}` (the pool
  is `downsample.0` where the stage strides; stage 1 keeps `downsample.{0,1}`);
- ResNet_CIFAR: a 3x3 `backbone.conv1` (7x7 in the ImageNet stem).

The keys are renamed onto the model `archs.build` makes (torchvision's names for the plain
and CIFAR ResNets, timm's for V1c/V1d), and every key must be accounted for both ways.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_export import archs
from model_export.archs import FAMILY_SPECS, ResNetSpec
from model_export.errors import ExportError
from model_export.sources import LoadedModel, _preview, from_module, sha256_file
from service.model_package import Source

BACKBONE = "backbone."
HEAD = "head.fc."
# Deep stem: timm's `conv1` Sequential (conv, bn, act, conv, bn, act, conv) and `bn1`.
_STEM_TO_MMPRETRAIN = {
    "conv1.0.": "stem.0.conv.",
    "conv1.1.": "stem.0.bn.",
    "conv1.3.": "stem.1.conv.",
    "conv1.4.": "stem.1.bn.",
    "conv1.6.": "stem.2.conv.",
    "bn1.": "stem.2.bn.",
}
_DOWNSAMPLE = re.compile(r"^(layer\d+\.0\.downsample\.)(\d+)\.(.*)$")
_BLOCK = re.compile(r"^backbone\.layer(\d)\.(\d+)\.")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Mapping[str, Any]]:
    """(state_dict, meta) from a `.pth`; only tensors and plain data are unpickled."""
    if not path.is_file():
        raise ExportError(f"MMPretrain checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ExportError(
            f"cannot read MMPretrain checkpoint {path}: it holds objects other than tensors and "
            "plain data, which are not unpickled; save only its `state_dict` and `meta` "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else 'UnpicklingError'})"
        ) from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot read MMPretrain checkpoint {path}: {reason}") from exc
    if not isinstance(checkpoint, Mapping):
        raise ExportError(f"MMPretrain checkpoint {path} does not hold a dict")
    state = checkpoint.get("state_dict", checkpoint)
    meta = checkpoint.get("meta") or {}
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ExportError(f"MMPretrain checkpoint {path} has no state_dict of tensors")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if not any(key.startswith(BACKBONE) for key in state):
        raise ExportError(
            f"{path} is not an MMPretrain classifier checkpoint: no `backbone.*` keys "
            f"(found {_preview(sorted(state))}); for a torchvision state dict use --weights-file"
        )
    return state, meta if isinstance(meta, Mapping) else {}


def detect(state: Mapping[str, torch.Tensor]) -> ResNetSpec:
    """The architecture the keys describe; an ExportError if it is not a supported ResNet."""
    blocks = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK.match(key)
        if match and 1 <= int(match.group(1)) <= 4:
            stage = int(match.group(1)) - 1
            blocks[stage] = max(blocks[stage], int(match.group(2)) + 1)
    bottleneck = any(key.startswith("backbone.layer1.0.conv3.") for key in state)
    kind = "bottleneck" if bottleneck else "basic"
    depth = next(
        (
            d
            for d, (block, counts) in archs.DEPTHS.items()
            if (block, counts) == (kind, tuple(blocks))
        ),
        None,
    )
    if depth is None:
        known = ", ".join(f"{d} ({b}, {list(c)})" for d, (b, c) in archs.DEPTHS.items())
        raise ExportError(
            f"the checkpoint's backbone has {kind} blocks {blocks} per stage, which is no "
            f"supported ResNet depth: {known}"
        )
    if any(key.startswith("backbone.stem.") for key in state):
        avg_down = any(re.match(r"^backbone\.layer[234]\.0\.downsample\.2\.", key) for key in state)
        return ResNetSpec(depth, "deep", avg_down=avg_down)
    stem = state.get("backbone.conv1.weight")
    if stem is not None and stem.ndim == 4 and tuple(stem.shape[2:]) == (3, 3):
        return ResNetSpec(depth, "cifar")
    return ResNetSpec(depth)


def mmpretrain_key(model_key: str, model: nn.Module) -> str:
    """The MMPretrain name of one of the model's state dict keys."""
    if model_key.startswith("fc."):
        return HEAD + model_key.removeprefix("fc.")
    if hasattr(model, "forward_features"):  # timm: deep stem, maybe the avg-pool shortcut
        for prefix, renamed in _STEM_TO_MMPRETRAIN.items():
            if model_key.startswith(prefix):
                return BACKBONE + renamed + model_key.removeprefix(prefix)
        match = _DOWNSAMPLE.match(model_key)
        if match:
            index = int(match.group(2))
            downsample = model.get_submodule(match.group(1).rstrip("."))
            # timm keeps an Identity where MMPretrain has no pool (a stride-1 stage).
            if isinstance(downsample, nn.Sequential) and isinstance(downsample[0], nn.Identity):
                index -= 1
            return f"{BACKBONE}{match.group(1)}{index}.{match.group(3)}"
    return BACKBONE + model_key


def class_names(meta: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """`meta.dataset_meta.classes` (MMPretrain 1.x) or `meta.CLASSES` (mmcls 0.x)."""
    dataset_meta = meta.get("dataset_meta")
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    if classes is None:
        classes = meta.get("CLASSES")
    if classes is None:
        return None
    names = [str(name) for name in classes]
    if len(names) != num_classes:
        raise ExportError(
            f"the checkpoint's meta names {len(names)} classes but its head has {num_classes}"
        )
    return names


def load_mmpretrain(
    path: Path, arch: str | None, num_classes: int | None, labels: list[str] | None
) -> LoadedModel:
    state, meta = read_checkpoint(path)
    head = state.get(HEAD + "weight")
    if head is None:
        raise ExportError(
            f"MMPretrain checkpoint {path} has no classification head ({HEAD}weight): "
            "resnet-serve needs a classifier's logits"
        )
    found = int(head.shape[0])
    if num_classes is not None and num_classes != found:
        raise ExportError(
            f"num_classes mismatch: MMPretrain checkpoint {path} has {found} classes "
            f"but --num-classes is {num_classes}"
        )
    spec = detect(state)
    if arch is not None and arch != spec.name:
        wanted = FAMILY_SPECS.get(arch)
        if wanted is None:
            raise ExportError(
                f"--arch {arch} is not an MMPretrain ResNet; the checkpoint looks like {spec.name}"
            )
        spec = wanted  # the user's word: the key check below says where it disagrees
    model = archs.build(spec.name, found)
    expected = {mmpretrain_key(key, model): key for key in model.state_dict()}
    ignored = ("data_preprocessor.",)  # MMPretrain 1.x keeps its mean/std buffers here
    present = {key for key in state if not key.startswith(ignored)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"MMPretrain checkpoint {path} does not match {spec.name}: "
            f"{len(missing)} missing keys {_preview(missing)}, "
            f"{len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    renamed = {model_key: state[mm_key] for mm_key, model_key in expected.items()}
    target = model.state_dict()
    wrong = [
        f"{mm_key} {tuple(state[mm_key].shape)} != {tuple(target[model_key].shape)}"
        for mm_key, model_key in expected.items()
        if state[mm_key].shape != target[model_key].shape
    ]
    if wrong:
        raise ExportError(
            f"MMPretrain checkpoint {path} does not match {spec.name}: "
            f"shape mismatch {_preview(wrong)}"
        )
    model.load_state_dict(renamed, strict=True)
    names = labels or class_names(meta, found) or [f"class_{index}" for index in range(found)]
    source = Source(kind="mmpretrain", path=str(path), sha256=sha256_file(path))
    return from_module(
        model,
        spec.name,
        names,
        archs.default_preprocessing(spec.name, found),
        source,
        trained=True,
    )
