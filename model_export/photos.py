"""Real photos for verification and INT8 calibration.

Verification uses photos scikit-image ships, preprocessed exactly as the service will
preprocess a client's upload (`service.images.preprocess`), so parity is checked on the pixels the
graph will really see. The 16 photos are split in two halves: INT8 is calibrated on one
(`CALIBRATION_PHOTO_NAMES`, varied with random crops, flips and colour jitter) and every
variant is verified on the other (`VERIFICATION_PHOTO_NAMES`), so INT8 is never checked on
images it was calibrated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from model_export.errors import ExportError
from service.errors import ImageTooLarge, InvalidImage
from service.images.preprocess import ImagePreprocessor
from service.model_package import PreprocessSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Real photographs among scikit-image's bundled data (drawings, charts and text left out).
SAMPLE_PHOTO_NAMES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "cell.png",
)
# Disjoint halves, each with colour photos, grey-scale ones and textures; the two
# motorcycle photos (a stereo pair) stay together.
CALIBRATION_PHOTO_NAMES = (
    "astronaut.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "coins.png",
    "brick.png",
)
VERIFICATION_PHOTO_NAMES = tuple(
    name for name in SAMPLE_PHOTO_NAMES if name not in CALIBRATION_PHOTO_NAMES
)
_MAX_PIXELS = 200_000_000


def sample_photo_dir() -> Path:
    try:
        import skimage
    except ImportError as exc:  # pragma: no cover - scikit-image is in the export extra
        raise ExportError(
            "scikit-image is not installed; it provides the sample photos "
            "(pip install 'resnet-serve[export]') or pass --calibration-dir"
        ) from exc
    return Path(skimage.__file__).parent / "data"


def sample_photos(names: tuple[str, ...] = SAMPLE_PHOTO_NAMES) -> list[Path]:
    directory = sample_photo_dir()
    photos = [directory / name for name in names if (directory / name).is_file()]
    if not photos:
        raise ExportError(f"no sample photos found in {directory}")
    return photos


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ExportError(f"calibration directory {directory} does not exist")
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not files:
        raise ExportError(
            f"calibration directory {directory} holds no images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def preprocess_files(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """Centre crops, exactly as the service makes them: [N, crop, crop, 3] uint8."""
    preprocess = ImagePreprocessor(spec, max_pixels=_MAX_PIXELS)
    arrays = []
    for path in paths:
        try:
            arrays.append(preprocess(path.read_bytes()))
        except (InvalidImage, ImageTooLarge) as exc:
            raise ExportError(f"cannot use image {path}: {exc.message}") from exc
    return np.stack(arrays)


def augmented_crops(
    paths: list[Path], spec: PreprocessSpec, per_image: int, seed: int, jitter: float = 0.0
) -> np.ndarray:
    """The centre crop of each photo plus `per_image - 1` random resized crops and flips,
    with brightness, contrast and saturation each scaled by a factor in 1 ± `jitter`."""
    rng = np.random.default_rng(seed)
    centre = preprocess_files(paths, spec)
    samples = list(centre)
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        width, height = image.size
        for _ in range(per_image - 1):
            area = width * height * rng.uniform(0.3, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_w = int(min(width, round(np.sqrt(area * aspect))))
            crop_h = int(min(height, round(np.sqrt(area / aspect))))
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            crop = image.resize(
                (spec.crop, spec.crop),
                Image.Resampling.BILINEAR,
                box=(left, top, left + crop_w, top + crop_h),
            )
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if jitter > 0:
                for enhance in (
                    ImageEnhance.Brightness,
                    ImageEnhance.Contrast,
                    ImageEnhance.Color,
                ):
                    crop = enhance(crop).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
            samples.append(np.asarray(crop, dtype=np.uint8))
    return np.stack(samples)


def random_pixels(count: int, crop: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, crop, crop, 3), dtype=np.uint8)
