"""Workload images: real photos (scikit-image's) as JPEG request bodies, at two sizes.

- "0.2MP": each photo resized to about 200,000 pixels (e.g. 516x387), quality 90;
- "12MP": each photo upscaled to 4000x3000 with a little sensor-like noise so the JPEG is
  as large as a phone photo's (3-6 MB), quality 92.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def _photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _load(name: str) -> Image.Image:
    with Image.open(_photo_dir() / name) as opened:
        return opened.convert("RGB")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def small_jpegs(pixels: int = 200_000) -> list[bytes]:
    bodies = []
    for name in PHOTOS:
        image = _load(name)
        scale = math.sqrt(pixels / (image.width * image.height))
        size = (round(image.width * scale), round(image.height * scale))
        bodies.append(_jpeg(image.resize(size, Image.Resampling.BICUBIC), 90))
    return bodies


def large_jpegs(size: tuple[int, int] = (4000, 3000), count: int = 2) -> list[bytes]:
    rng = np.random.default_rng(0)
    bodies = []
    for name in PHOTOS[:count]:
        image = _load(name).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        bodies.append(_jpeg(image, 92))
    return bodies
