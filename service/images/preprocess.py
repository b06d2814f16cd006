"""Encoded image bytes → the graph's uint8 RGB input, the way the model package says.

Decoding is the costliest step outside the model, so it avoids work it can: the pixel
count is checked from the header before anything is decoded, JPEGs decode at a reduced
DCT scale when that still leaves enough pixels (`Image.draft`), and the resize samples
only the region that survives the centre crop, straight into the output size.
Pillow releases the GIL while it decodes and resamples, so this runs well in threads.

Memory is bounded too: the pixels being decoded at once, across threads, are capped by a
shared `PixelBudget`, and deep (16-bit, float) images are brought to 8 bits a block of rows
at a time rather than through a whole-image float64 copy.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, clipped
from service.images.pixel_budget import PixelBudget
from service.model_package import Interpolation, PreprocessSpec

_RESAMPLE = {
    Interpolation.NEAREST: Image.Resampling.NEAREST,
    Interpolation.BILINEAR: Image.Resampling.BILINEAR,
    Interpolation.BICUBIC: Image.Resampling.BICUBIC,
    Interpolation.LANCZOS: Image.Resampling.LANCZOS,
}

# EXIF orientation tag values → the transpose that makes the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# Formats a client may send. Anything else Pillow can open (EPS, PSD, ...) is refused:
# each extra decoder is attack surface and none of them is a photo format.
WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


@functools.cache
def accepted_formats() -> tuple[str, ...]:
    """The wanted formats this Pillow build can open: asking `Image.open` for one whose
    plugin is absent (AVIF before Pillow 11.2, or a build without libavif) raises KeyError
    for any unrecognised bytes instead of a clean "not an image"."""
    Image.init()
    return tuple(name for name in WANTED_FORMATS if name in Image.OPEN)


# Rows converted per step when bringing a deep image to 8 bits: bounds the temporary copy.
_ROWS_PER_BLOCK = 256

# Resample in two steps (integer box reduce, then the filter) once the image is this many
# times larger than the target: far faster on huge PNGs, indistinguishable in practice.
_REDUCING_GAP = 3.0


def crop_box(width: int, height: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """The source region that `Resize(spec.resize)` then `CenterCrop(spec.crop)` keeps.

    Sizes and offsets are rounded as torchvision rounds them, so resampling this box
    straight to crop x crop samples the same points as resizing the whole image first.
    """
    if width <= height:
        new_width, new_height = spec.resize, int(spec.resize * height / width)
    else:
        new_width, new_height = int(spec.resize * width / height), spec.resize
    left = round((new_width - spec.crop) / 2.0)
    top = round((new_height - spec.crop) / 2.0)
    scale_x, scale_y = width / new_width, height / new_height
    return (
        left * scale_x,
        top * scale_y,
        (left + spec.crop) * scale_x,
        (top + spec.crop) * scale_y,
    )


# Single-channel modes deeper than 8 bits (16-bit PNG, TIFF): Pillow's convert() would
# clip them to 255 rather than scale them.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit or float samples to 0..255, a block of rows at a time in float32: the
    only full-size copies are the samples (2-4 bytes a pixel) and the 8-bit result."""
    values = np.asarray(image)
    if image.mode == "F":  # floats: 0..1 or 0..255
        full_scale = 1.0 if float(values.max(initial=0.0)) <= 1.0 else 255.0
    else:  # 16-bit samples (mode I holds them too, once loaded from a 16-bit file)
        full_scale = 65535.0
    out = np.empty(values.shape, dtype=np.uint8)
    factor = np.float32(255.0 / full_scale)
    for start in range(0, values.shape[0], _ROWS_PER_BLOCK):
        block = values[start : start + _ROWS_PER_BLOCK].astype(np.float32)
        block *= factor
        np.clip(block, 0.0, 255.0, out=block)
        np.rint(block, out=block)
        out[start : start + _ROWS_PER_BLOCK] = block
    return Image.fromarray(out, "L")


def disable_pillow_bomb_check() -> None:
    """Our own pixel limit (per image, from the header) is the one that applies. Pillow's
    would warn between 1x and 2x its default, and silencing that per call needs
    `warnings.catch_warnings`, which is not thread-safe; so it is switched off once."""
    Image.MAX_IMAGE_PIXELS = None


class ImagePreprocessor:
    """Turns one encoded image into a `(crop, crop, 3)` uint8 array, or raises a 4xx error."""

    def __init__(
        self, spec: PreprocessSpec, max_pixels: int, budget: PixelBudget | None = None
    ) -> None:
        if spec.resize < spec.crop:
            raise ValueError(f"resize ({spec.resize}) must be at least crop ({spec.crop})")
        self.spec = spec
        self.max_pixels = max_pixels
        self.budget = budget
        self._resample = _RESAMPLE[spec.interpolation]
        disable_pillow_bomb_check()

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.spec.crop, self.spec.crop, 3)

    def check(self, data: bytes) -> int:
        """Read only the header: raise the error a full decode would raise for a bad
        format or too many pixels, else return the pixel count. Cheap enough to run on
        the event loop."""
        with _decode_errors():
            width, height = self._open(data).size
            return width * height

    def __call__(self, data: bytes) -> np.ndarray:
        with _decode_errors():
            return self._decode(data)

    def _open(self, data: bytes) -> Image.Image:
        if not data:
            raise InvalidImage("the image is empty")
        image: Image.Image = Image.open(io.BytesIO(data), formats=accepted_formats())
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {width * height} pixels; "
                f"the limit is {self.max_pixels}"
            )
        if width < 1 or height < 1:
            raise InvalidImage("the image has no pixels")
        return image

    def _decode(self, data: bytes) -> np.ndarray:
        image = self._open(data)
        if image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale while both sides stay >= the resize target.
            image.draft("RGB", (self.spec.resize, self.spec.resize))
        width, height = image.size  # as it will be decoded (after any draft reduction)
        budget = self.budget.hold(width * height) if self.budget else nullcontext()
        with budget:
            return self._to_input(image)

    def _to_input(self, image: Image.Image) -> np.ndarray:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
        transpose = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
        if image.mode in _HIGH_DEPTH_MODES:
            image = _to_8_bit(image)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if transpose is not None:
            image = image.transpose(transpose)
        width, height = image.size
        resized = image.resize(
            (self.spec.crop, self.spec.crop),
            self._resample,
            box=crop_box(width, height, self.spec),
            reducing_gap=_REDUCING_GAP,
        )
        # Grey is resized before it is copied to three channels: the same pixels, a third
        # of the memory and time on a large image.
        return np.asarray(resized.convert("RGB"), dtype=np.uint8)


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's many failure types → our two client errors."""
    try:
        yield
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels ({clipped(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"the data is not an image in a supported format ({', '.join(accepted_formats())})"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        # Truncated or corrupt streams surface as any of these from Pillow's decoders.
        raise InvalidImage(f"the image could not be decoded: {clipped(exc)}") from exc
