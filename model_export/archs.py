"""The ResNet architectures `resnet-export` builds, by name.

- `resnet18` … `resnext101_64x4d`: torchvision's ResNet family (also MMPretrain's plain
  `ResNet`, whose layers and key names are torchvision's).
- `resnetv1c50`, `resnetv1d50`, … (depths 18, 34, 50, 101, 152): MMPretrain's ResNetV1c
  (deep 3-convolution stem) and ResNetV1d (deep stem and an average-pool shortcut), built
  from timm's ResNet (`stem_type="deep"`, `stem_width=32`, `avg_down`), the definitions
  timm's `resnet50c` / `resnet50d` use.
- `resnet18_cifar`, …: MMPretrain's `ResNet_CIFAR`: a 3x3 stride-1 stem convolution and no
  max-pool, for 32x32 inputs. Neither torchvision nor timm defines it, so it is torchvision's
  ResNet with those two layers replaced (see `CifarStem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from service.model_package import PreprocessSpec

# depth → (block, blocks per stage), as torchvision, timm and MMPretrain all define them.
DEPTHS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
Stem = Literal["standard", "deep", "cifar"]

# MMPretrain's CIFAR pipelines normalise with these (its configs give them on 0..255).
CIFAR10_MEAN = (125.307 / 255, 122.961 / 255, 113.8575 / 255)
CIFAR10_STD = (51.5865 / 255, 50.847 / 255, 51.255 / 255)
CIFAR100_MEAN = (129.304 / 255, 124.070 / 255, 112.434 / 255)
CIFAR100_STD = (68.170 / 255, 65.392 / 255, 70.418 / 255)
CIFAR_SIZE = 32


@dataclass(frozen=True)
class ResNetSpec:
    """One member of the ResNet / ResNetV1c / ResNetV1d / ResNet_CIFAR family."""

    depth: int
    stem: Stem = "standard"
    avg_down: bool = False

    @property
    def name(self) -> str:
        if self.stem == "cifar":
            return f"resnet{self.depth}_cifar"
        if self.stem == "deep":
            return f"resnetv1{'d' if self.avg_down else 'c'}{self.depth}"
        return f"resnet{self.depth}"

    @property
    def bottleneck(self) -> bool:
        return DEPTHS[self.depth][0] == "bottleneck"

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return DEPTHS[self.depth][1]

    @property
    def embedding_dim(self) -> int:
        return 2048 if self.bottleneck else 512


FAMILY_SPECS: dict[str, ResNetSpec] = {
    spec.name: spec
    for depth in DEPTHS
    for spec in (
        ResNetSpec(depth),
        ResNetSpec(depth, "deep", avg_down=False),
        ResNetSpec(depth, "deep", avg_down=True),
        ResNetSpec(depth, "cifar"),
    )
}
ALL_ARCHS = tuple(dict.fromkeys([*TORCHVISION_ARCHS, *FAMILY_SPECS]))


def cifar_preprocessing(num_classes: int) -> PreprocessSpec:
    """32x32, no resize or crop beyond it, and the CIFAR-10 (or CIFAR-100) mean and std."""
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    return PreprocessSpec(resize=CIFAR_SIZE, crop=CIFAR_SIZE, mean=mean, std=std)


def default_preprocessing(arch: str, num_classes: int) -> PreprocessSpec:
    spec = FAMILY_SPECS.get(arch)
    if spec is not None and spec.stem == "cifar":
        return cifar_preprocessing(num_classes)
    return PreprocessSpec()


def build(arch: str, num_classes: int) -> nn.Module:
    """An initialised (random) model of `arch`, in eval mode."""
    spec = FAMILY_SPECS.get(arch)
    if spec is None or spec.stem == "standard":
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes).eval()
    if spec.stem == "cifar":
        return build_cifar(spec, num_classes).eval()
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    block: Any = Bottleneck if spec.bottleneck else BasicBlock
    return ResNet(
        block,
        spec.blocks,
        num_classes=num_classes,
        stem_width=32,
        stem_type="deep",
        avg_down=spec.avg_down,
    ).eval()


def build_cifar(spec: ResNetSpec, num_classes: int) -> nn.Module:
    """MMPretrain's ResNet_CIFAR: torchvision's ResNet with a 3x3, stride-1 stem convolution
    (`conv1`, 64 channels, no bias) and no max-pool; the stages, `bn1` and `fc` are as in
    torchvision, so the state dict keys are torchvision's."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block = Bottleneck if spec.bottleneck else BasicBlock
    model = ResNet(block, list(spec.blocks), num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
