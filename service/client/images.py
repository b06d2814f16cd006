"""What callers pass as images → the encoded bytes the service decodes.

Paths and bytes go as they are (the service reads JPEG, PNG, WebP, ...). PIL images and
numpy arrays are encoded as PNG: lossless, so the service sees exactly these pixels.
Pillow and numpy are imported only when such an image is given.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    ImageInput: TypeAlias = (
        str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
    )
else:
    ImageInput: TypeAlias = Any

Images: TypeAlias = "ImageInput | Iterable[ImageInput]"

# zlib level 1, not Pillow's 6: 3-4x faster for ~5-20% more bytes (a 224x224 photo: 7 ms
# rather than 19 on this machine); lossless at any level.
_PNG_LEVEL = 1
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


def encode_all(images: Images) -> list[bytes]:
    """One encoded image per input; `images` is one image or an iterable of them (a 4-D
    array is a batch: one image per leading index)."""
    if _is_array_batch(images):
        items = list(cast(Iterable[Any], images))
    elif _is_one_image(images) or not isinstance(images, Iterable):
        items = [images]  # encode() says what it cannot send
    else:
        items = list(cast(Iterable[Any], images))
    if not items:
        raise ValueError("no images given")
    return [encode(item, index) for index, item in enumerate(items)]


def encode(image: ImageInput, index: int = 0) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    kind = type(image).__module__.split(".", 1)[0]
    if kind == "PIL":
        return _png_from_pil(image)
    if kind == "numpy":
        return _png_from_array(image, index)
    raise TypeError(
        f"images[{index}] is a {type(image).__name__}; give a path, bytes, a PIL image "
        "or a uint8 numpy array (H x W x 3, or H x W)"
    )


def _is_one_image(images: object) -> bool:
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike):
        return True
    module = type(images).__module__.split(".", 1)[0]
    return module in ("PIL", "numpy")


def _is_array_batch(images: object) -> bool:
    return type(images).__module__.split(".", 1)[0] == "numpy" and getattr(images, "ndim", 0) == 4


def _png_from_pil(image: Any) -> bytes:
    if image.mode not in _PNG_MODES:  # CMYK, YCbCr, F, ...: PNG cannot hold them
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


def _png_from_array(array: Any, index: int) -> bytes:
    import numpy as np
    from PIL import Image

    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    if array.dtype != np.uint8 or not shape_ok:
        raise ValueError(
            f"images[{index}] is a {array.dtype} array of shape {array.shape}; give uint8 "
            "pixels, H x W x 3 (RGB) or H x W (grey)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return _png_from_pil(Image.fromarray(np.ascontiguousarray(array)))  # RGB, or L for H x W
