"""MMPretrain checkpoints: ResNet, ResNetV1c, ResNetV1d and ResNet_CIFAR, read without MMCV.

MMPretrain itself needs MMCV and is not installed, so each checkpoint is made here: a model
from the library that defines the architecture (torchvision's ResNet, timm's `resnet*c` /
`resnet*d`; for ResNet_CIFAR, which neither defines, `cifar_resnet` below written from
MMPretrain's documented layers), its state dict renamed to MMPretrain's key layout by
`to_mmpretrain` below, and saved with a `meta` the way MMPretrain 1.x or mmcls 0.x saves it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from model_export import mmpretrain
from model_export.cli import main
from service.config import Settings
from service.frontend.app import create_app
from service.model_package import Manifest, ModelPackage
from tests.conftest import to_jpeg
from tests.export.test_export import (
    assert_parity,
    error_line,
    labels_of,
    normalised,
    perturb_batchnorm,
    photo_pixels,
    run_onnx,
    sha256,
)
from tests.support import running_server

CIFAR10_MEAN = (125.307 / 255, 122.961 / 255, 113.8575 / 255)
CIFAR10_STD = (51.5865 / 255, 50.847 / 255, 51.255 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------ reference architectures


class CifarResNet(nn.Module):
    """MMPretrain's ResNet_CIFAR as its docs describe it: conv1 3x3/1 (64, no bias), bn1,
    ReLU, no max-pool, the four ResNet stages, global average pool, `head.fc`."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # torchvision's ResNet only as a supplier of its stages.
        stages = torchvision.models.resnet.ResNet(block, layers)
        self.layer1, self.layer2 = stages.layer1, stages.layer2
        self.layer3, self.layer4 = stages.layer3, stages.layer4
        self.fc = nn.Linear(512 * block.expansion, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(depth: int, classes: int) -> nn.Module:
    block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
    return CifarResNet(block, layers, classes)


def timm_deep_stem(name: str, classes: int) -> nn.Module:
    if name == "resnetv1c18":  # timm registers no resnet18c: its ResNet class, as resnet50c
        from timm.models.resnet import BasicBlock as TimmBasic
        from timm.models.resnet import ResNet

        return ResNet(TimmBasic, [2, 2, 2, 2], num_classes=classes, stem_width=32, stem_type="deep")
    timm_name = {"resnetv1c50": "resnet50c", "resnetv1d18": "resnet18d", "resnetv1d50": "resnet50d"}
    timm_name["resnetv1d101"] = "resnet101d"
    return timm.create_model(timm_name[name], pretrained=False, num_classes=classes)


REFERENCES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda n: torchvision.models.resnet18(num_classes=n),
    "resnet50": lambda n: torchvision.models.resnet50(num_classes=n),
    "resnetv1c18": lambda n: timm_deep_stem("resnetv1c18", n),
    "resnetv1c50": lambda n: timm_deep_stem("resnetv1c50", n),
    "resnetv1d18": lambda n: timm_deep_stem("resnetv1d18", n),
    "resnetv1d50": lambda n: timm_deep_stem("resnetv1d50", n),
    "resnetv1d101": lambda n: timm_deep_stem("resnetv1d101", n),
    "resnet18_cifar": lambda n: cifar_resnet(18, n),
    "resnet50_cifar": lambda n: cifar_resnet(50, n),
}

# ------------------------------------------------------- MMPretrain's checkpoint layout

_TIMM_STEM = {
    "conv1.0.": "stem.0.conv.",
    "conv1.1.": "stem.0.bn.",
    "conv1.3.": "stem.1.conv.",
    "conv1.4.": "stem.1.bn.",
    "conv1.6.": "stem.2.conv.",
    "bn1.": "stem.2.bn.",
}


def to_mmpretrain(model: nn.Module) -> dict[str, torch.Tensor]:
    """MMPretrain's names: `backbone.` + the stem (deep: three ConvModules `stem.<i>.conv`,
    `stem.<i>.bn`) and stages, `head.fc.` for the classifier. In ResNetV1d the shortcut is
    [AvgPool, conv, bn] only where the stage strides, else [conv, bn]; timm keeps an
    Identity in place of the pool, so its stride-1 indices are one higher."""
    renamed = {}
    deep = any(key.startswith("conv1.0.") for key in model.state_dict())
    for key, value in model.state_dict().items():
        new = key
        if key.startswith("fc."):
            renamed["head." + key] = value.clone()
            continue
        if deep:
            for prefix, target in _TIMM_STEM.items():
                if key.startswith(prefix):
                    new = target + key.removeprefix(prefix)
            match = re.match(r"(layer(\d)\.0\.downsample\.)(\d)\.(.*)", key)
            pooled = match and isinstance(
                model.get_submodule(f"layer{match.group(2)}.0.downsample.0"), nn.AvgPool2d
            )
            if (
                match
                and not pooled
                and len(model.get_submodule(f"layer{match.group(2)}.0.downsample")) == 3
            ):
                new = f"{match.group(1)}{int(match.group(3)) - 1}.{match.group(4)}"
        renamed["backbone." + new] = value.clone()
    return renamed


def make_model(arch: str, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = REFERENCES[arch](classes).eval()
    perturb_batchnorm(model, seed + 1)
    return model


def save_checkpoint(
    path: Path, model: nn.Module, meta: dict[str, object] | None = None
) -> dict[str, torch.Tensor]:
    state = to_mmpretrain(model)
    torch.save({"meta": meta or {}, "state_dict": state}, path)
    return state


def test_key_layout_is_mmpretrains() -> None:
    """Anchors for the renaming above, as MMPretrain's own checkpoints name these tensors."""
    v1d50 = set(to_mmpretrain(REFERENCES["resnetv1d50"](10)))
    assert {
        "backbone.stem.0.conv.weight",
        "backbone.stem.2.bn.running_var",
        "backbone.layer1.0.downsample.0.weight",  # stride 1: no pool, conv first
        "backbone.layer1.0.downsample.1.running_mean",
        "backbone.layer2.0.downsample.1.weight",  # stride 2: pool, conv, bn
        "backbone.layer2.0.downsample.2.weight",
        "backbone.layer4.2.conv3.weight",
        "head.fc.weight",
    } <= v1d50
    assert "backbone.layer1.0.downsample.2.weight" not in v1d50
    cifar = to_mmpretrain(REFERENCES["resnet18_cifar"](10))
    assert tuple(cifar["backbone.conv1.weight"].shape) == (64, 3, 3, 3)
    assert "backbone.bn1.weight" in cifar


# --------------------------------------------------------------- recognise and load


@pytest.mark.parametrize("arch", list(REFERENCES))
def test_architecture_recognised_and_loaded(tmp_path: Path, arch: str) -> None:
    """Every architecture is recognised from its keys alone, loaded, and computes what the
    library's own model computes."""
    model = make_model(arch, 10, seed=len(arch))
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, model)
    loaded = mmpretrain.load_mmpretrain(path, None, None, None)
    assert loaded.arch == arch
    assert loaded.num_classes == 10
    assert loaded.labels == [f"class_{index}" for index in range(10)]  # no classes in meta
    size = 32 if arch.endswith("_cifar") else 64
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixels)
        logits, embedding = loaded.reference(pixels)
    assert embedding.shape == (2, 2048 if "50" in arch or "101" in arch else 512)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[0], expected[1])


# -------------------------------------------------------------- export through the CLI


@pytest.mark.parametrize(
    ("arch", "meta", "labels"),
    [
        ("resnetv1d18", {"dataset_meta": {"classes": [f"kind {i}" for i in range(10)]}}, "kind"),
        ("resnetv1c18", {"CLASSES": [f"old {i}" for i in range(10)]}, "old"),
    ],
    ids=["v1d-mmpretrain1", "v1c-mmcls0"],
)
def test_export_matches_pytorch(
    tmp_path: Path,
    photo_pngs: list[bytes],
    capsys: pytest.CaptureFixture[str],
    arch: str,
    meta: dict[str, object],
    labels: str,
) -> None:
    model = make_model(arch, 10, seed=7)
    checkpoint, package = tmp_path / "epoch_100.pth", tmp_path / "package"
    save_checkpoint(checkpoint, model, meta)
    code = main(["--mmpretrain-checkpoint", str(checkpoint), "--out", str(package), "--quiet"])
    assert code == 0, capsys.readouterr().err

    manifest = Manifest.model_validate_json((package / "manifest.json").read_bytes())
    assert manifest.arch == arch
    assert manifest.source.kind == "mmpretrain"
    assert manifest.source.sha256 == sha256(checkpoint)
    assert manifest.trained is True
    assert labels_of(package) == [f"{labels} {i}" for i in range(10)]
    pixels = photo_pixels(photo_pngs, manifest.preprocessing)
    with torch.no_grad():
        inputs = normalised(pixels, IMAGENET_MEAN, IMAGENET_STD)
        captured: list[torch.Tensor] = []
        hook = model.fc.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
        ref_logits = model(inputs).numpy()
        hook.remove()
    assert_parity(run_onnx(package / "model.onnx", pixels), ref_logits, captured[0].numpy())


# --------------------------------------------------------------------- refusals


def _bad_checkpoint(tmp: Path, change: str) -> tuple[list[str], list[str]]:
    model = make_model("resnetv1d18", 10, seed=3)
    path = tmp / "bad.pth"
    state = to_mmpretrain(model)
    if change == "missing-and-unexpected":
        del state["backbone.layer2.0.downsample.1.weight"]
        state["backbone.layer2.0.extra.weight"] = torch.zeros(1)
        expect = [
            "does not match resnetv1d18",
            "1 missing keys [backbone.layer2.0.downsample.1.weight]",
            "1 unexpected keys [backbone.layer2.0.extra.weight]",
        ]
    elif change == "arch-mismatch":
        torch.save({"meta": {}, "state_dict": state}, path)
        return (
            ["--mmpretrain-checkpoint", str(path), "--arch", "resnetv1c18"],
            ["does not match resnetv1c18", "unexpected keys", "downsample.2"],
        )
    elif change == "missing-file":
        return (["--mmpretrain-checkpoint", str(tmp / "nope.pth")], ["does not exist", "nope.pth"])
    elif change == "meta-class-count":
        torch.save({"meta": {"CLASSES": ["a", "b"]}, "state_dict": state}, path)
        return (["--mmpretrain-checkpoint", str(path)], ["meta names 2 classes", "head has 10"])
    elif change == "torchvision-state-dict":
        torch.save(torchvision.models.resnet18().state_dict(), path)
        expect = ["no `backbone.*` keys", "--weights-file"]
        return (["--mmpretrain-checkpoint", str(path)], expect)
    else:  # odd depth
        state = {k: v for k, v in state.items() if not k.startswith("backbone.layer3.1.")}
        expect = ["basic blocks [2, 2, 1, 2]", "no supported ResNet depth"]
    torch.save({"meta": {}, "state_dict": state}, path)
    return (["--mmpretrain-checkpoint", str(path)], expect)


@pytest.mark.parametrize(
    "change",
    [
        "missing-and-unexpected",
        "arch-mismatch",
        "missing-file",
        "meta-class-count",
        "torchvision-state-dict",
        "odd-depth",
    ],
)
def test_bad_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    argv, expect = _bad_checkpoint(tmp_path, change)
    out = tmp_path / "pkg"
    code = main([*argv, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    line = error_line(captured.err)
    for text in expect:
        assert text in line
    assert not out.exists()


def test_weights_file_refuses_a_non_torchvision_arch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--weights-file",
            str(tmp_path / "w.pth"),
            "--arch",
            "resnetv1d50",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    assert code == 2
    assert "--mmpretrain-checkpoint" in error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------ CIFAR


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = make_model("resnet18_cifar", 10, seed=11)
    path = tmp_path_factory.mktemp("cifar") / "resnet18_8xb16_cifar10.pth"
    classes = ["airplane", "automobile", "bird", "cat", "deer"]
    classes += ["dog", "frog", "horse", "ship", "truck"]
    save_checkpoint(path, model, {"dataset_meta": {"classes": classes}})
    return path, model


@pytest.fixture(scope="module")
def cifar_package(
    tmp_path_factory: pytest.TempPathFactory, cifar_checkpoint: tuple[Path, nn.Module]
) -> Path:
    out = tmp_path_factory.mktemp("cifar-pkg") / "resnet18_cifar"
    code = main(["--mmpretrain-checkpoint", str(cifar_checkpoint[0]), "--out", str(out), "--quiet"])
    assert code == 0
    return out


def cifar_images(count: int, seed: int) -> list[Image.Image]:
    """32x32 images like CIFAR's: small crops of the photos, and random pixels."""
    from tests.conftest import PHOTO_NAMES, sample_dir

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        if index % 4 == 3:
            images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
            continue
        with Image.open(sample_dir() / PHOTO_NAMES[index % len(PHOTO_NAMES)]) as opened:
            photo = opened.convert("RGB")
        side = int(min(photo.size) * rng.uniform(0.3, 1.0))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        images.append(
            photo.resize(
                (32, 32), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
            )
        )
    return images


def test_cifar_package_preprocessing_and_parity(
    cifar_package: Path, cifar_checkpoint: tuple[Path, nn.Module]
) -> None:
    manifest = ModelPackage.load(cifar_package).manifest
    assert manifest.arch == "resnet18_cifar"
    spec = manifest.preprocessing
    assert (spec.resize, spec.crop) == (32, 32)
    assert spec.mean == pytest.approx(CIFAR10_MEAN)
    assert spec.std == pytest.approx(CIFAR10_STD)
    assert manifest.inputs[0].shape == ["batch", 32, 32, 3]
    assert labels_of(cifar_package)[3] == "cat"
    # A 32x32 image reaches the graph untouched: no resize or crop beyond 32x32.
    images = cifar_images(8, seed=1)
    bodies = [to_png(image) for image in images]
    pixels = photo_pixels(bodies, spec)
    np.testing.assert_array_equal(pixels, np.stack([np.asarray(image) for image in images]))
    model = cifar_checkpoint[1]
    with torch.no_grad():
        captured: list[torch.Tensor] = []
        hook = model.fc.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
        ref_logits = model(normalised(pixels, CIFAR10_MEAN, CIFAR10_STD)).numpy()
        hook.remove()
    assert_parity(run_onnx(cifar_package / "model.onnx", pixels), ref_logits, captured[0].numpy())


def to_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_cifar_model_served_end_to_end(cifar_package: Path) -> None:
    """The same service serves a 32x32 CIFAR package: its preprocessing follows the manifest."""
    images = cifar_images(4, seed=2)
    expected = run_onnx(
        cifar_package / "model.onnx", np.stack([np.asarray(image) for image in images])
    )["logits"]
    big_photo = to_jpeg(cifar_images(1, seed=3)[0].resize((320, 240)))
    settings = Settings(model_dir=cifar_package, precision="fp32", max_batch_size=4)
    app = create_app(settings)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/info").json()
        assert "resnet18_cifar" in str(info)
        for image, logits in zip(images, expected, strict=True):
            response = http.post(
                "/predict?top_k=3", content=to_png(image), headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"][0]
            assert [p["index"] for p in predictions] == list(np.argsort(-logits, kind="stable")[:3])
            assert predictions[0]["label"] == labels_of(cifar_package)[int(np.argmax(logits))]
        # Any photo is resized to 32 on its shorter side and centre-cropped to 32x32.
        response = http.post("/embed", content=big_photo, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        assert response.json()["dim"] == 512
