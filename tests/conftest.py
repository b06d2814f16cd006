"""Shared fixtures: real photos, and model packages exported once per test session."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """A test that runs `resnet-serve`'s main in-process leaves the root logger writing to
    that test's captured stderr, closed once it ends: a later test whose libraries log
    (ONNX Script's passes do, at INFO) would get a logging error in its own output."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def sample_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def to_jpeg(image: Image.Image, quality: int = 90, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo_images() -> dict[str, Image.Image]:
    """Real photos from scikit-image, as RGB PIL images."""
    images = {}
    for name in PHOTO_NAMES:
        with Image.open(sample_dir() / name) as opened:
            images[name] = opened.convert("RGB")
    return images


@pytest.fixture(scope="session")
def photo_jpegs(photo_images: dict[str, Image.Image]) -> dict[str, bytes]:
    """The same photos as JPEG request bodies."""
    return {name: to_jpeg(image) for name, image in photo_images.items()}


@pytest.fixture(scope="session")
def distinct_jpegs(photo_images: dict[str, Image.Image]) -> list[bytes]:
    """16 visibly different JPEGs (crops, flips, rotations of the photos), so concurrent
    responses can be matched to the image they answer."""
    rng = np.random.default_rng(7)
    bodies = []
    names = list(photo_images)
    for index in range(16):
        image = photo_images[names[index % len(names)]]
        width, height = image.size
        left = int(rng.integers(0, width // 3))
        top = int(rng.integers(0, height // 3))
        crop = image.crop((left, top, left + width * 2 // 3, top + height * 2 // 3))
        if index % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        bodies.append(to_jpeg(crop.rotate(int(rng.integers(0, 4)) * 90, expand=True)))
    return bodies


def export_package(out: Path, *extra: str) -> Path:
    from model_export.cli import main

    code = main(["--random-init", "--seed", "0", "--out", str(out), "--quiet", *extra])
    assert code == 0, f"export failed with exit status {code}"
    return out


@pytest.fixture(scope="session")
def resnet50_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-50, random init (seed 0), with FP32, INT8 and FP16 variants: exported once."""
    out = tmp_path_factory.mktemp("packages") / "resnet50"
    return export_package(out, "--arch", "resnet50", "--precision", "int8", "--precision", "fp16")


@pytest.fixture(scope="session")
def resnet18_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, fast package (FP32 + INT8) for service tests that only need some model."""
    out = tmp_path_factory.mktemp("packages") / "resnet18"
    return export_package(out, "--arch", "resnet18", "--precision", "int8")


@pytest.fixture(scope="session")
def resnet18_fp16_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 with FP32 and FP16 variants (about 20 s on 2 cores): for the GPU path."""
    out = tmp_path_factory.mktemp("packages") / "resnet18-fp16"
    return export_package(out, "--arch", "resnet18", "--precision", "fp16")


@pytest.fixture(scope="session")
def photo_pngs(photo_images: dict[str, Image.Image]) -> list[bytes]:
    """The same photos as lossless request bodies."""
    bodies = []
    for image in photo_images.values():
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies
