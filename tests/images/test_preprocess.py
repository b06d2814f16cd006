"""ImagePreprocessor and crop_box against independent references.

The reference for the geometry is torchvision's own `Resize` then `CenterCrop` on the
PIL image; lossless encodings (PNG) are used wherever the comparison must not pick up
JPEG artefacts.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from service.errors import ImageTooLarge, InvalidImage
from service.images import preprocess as preprocess_module
from service.images.preprocess import ImagePreprocessor, crop_box
from service.model_package import Interpolation, PreprocessSpec
from tests.support import png_claiming

MAX_PIXELS = 50_000_000
DEFAULT_SPEC = PreprocessSpec()  # Resize(256), CenterCrop(224), bilinear: IMAGENET1K_V1
V2_SPEC = PreprocessSpec(resize=232, crop=224, interpolation=Interpolation.BICUBIC)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG", compress_level=1)


def abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def torchvision_reference(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    mode = {
        Interpolation.BILINEAR: InterpolationMode.BILINEAR,
        Interpolation.BICUBIC: InterpolationMode.BICUBIC,
    }[spec.interpolation]
    pipeline = transforms.Compose(
        [transforms.Resize(spec.resize, interpolation=mode), transforms.CenterCrop(spec.crop)]
    )
    return np.asarray(pipeline(image))


# Shapes cut from each photo: as it is (landscape or square), turned to portrait, and thin
# strips both ways, so both the horizontal and the vertical crop offsets get exercised.
VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as_is": lambda image: image,
    "portrait": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "wide_strip": lambda image: image.crop((0, 0, image.width, image.height // 3)),
    "tall_strip": lambda image: image.crop((0, 0, image.width // 3, image.height)),
}


@pytest.fixture(scope="module")
def preprocess() -> ImagePreprocessor:
    return ImagePreprocessor(DEFAULT_SPEC, MAX_PIXELS)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_torchvision_resize_then_center_crop(
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    name: str,
    variant: str,
) -> None:
    image = VARIANTS[variant](photo_images[name])
    out = preprocess(png(image))
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    diff = abs_diff(out, torchvision_reference(image, DEFAULT_SPEC))
    assert diff.max() <= 2, f"{image.size}: max abs diff {diff.max()}"
    assert diff.mean() < 0.5, f"{image.size}: mean abs diff {diff.mean():.3f}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_torchvision_v2_bicubic_232(
    photo_images: dict[str, Image.Image], name: str, variant: str
) -> None:
    """torchvision's IMAGENET1K_V2 preprocessing: Resize(232, bicubic), CenterCrop(224).

    The box resize samples the same points as resize-then-crop, but Pillow picks the
    order of its two passes from the scale factors (vertical first when the height
    shrinks much more than the width), so the two paths can round and clip bicubic
    overshoot differently in between: a handful of values in a portrait image differ by
    more than 1 (up to 8 seen). A shifted or mis-scaled crop would move the mean far
    above the bound.
    """
    image = VARIANTS[variant](photo_images[name])
    out = ImagePreprocessor(V2_SPEC, MAX_PIXELS)(png(image))
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    diff = abs_diff(out, torchvision_reference(image, V2_SPEC))
    assert diff.mean() < 0.5, f"{image.size}: mean abs diff {diff.mean():.3f}"
    assert (diff > 2).mean() < 1e-3, f"{image.size}: {(diff > 2).sum()} values differ by > 2"
    assert diff.max() <= 12, f"{image.size}: max abs diff {diff.max()}"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 600x400 → Resize(256) gives 384x256; the crop starts at (80, 16); scale 1.5625.
        ((600, 400), (125.0, 25.0, 475.0, 375.0)),
        ((400, 600), (25.0, 125.0, 375.0, 475.0)),
        # Square: 256x256, crop at (16, 16), scale 2.
        ((512, 512), (32.0, 32.0, 480.0, 480.0)),
        # 1004x1000 → 257x256: (257 - 224) / 2 = 16.5 rounds half to even, to 16.
        ((1004, 1000), (16 * 1004 / 257, 62.5, 240 * 1004 / 257, 937.5)),
        # Already 256 on the short side: the crop box is the plain centre crop.
        ((256, 300), (16.0, 38.0, 240.0, 262.0)),
    ],
)
def test_crop_box_is_the_region_resize_then_center_crop_keeps(
    size: tuple[int, int], expected: tuple[float, float, float, float]
) -> None:
    assert crop_box(*size, DEFAULT_SPEC) == pytest.approx(expected)


def test_output_shape_follows_the_spec(photo_images: dict[str, Image.Image]) -> None:
    spec = PreprocessSpec(resize=200, crop=192)
    preprocess = ImagePreprocessor(spec, MAX_PIXELS)
    assert preprocess.output_shape == (192, 192, 3)
    image = photo_images["coffee.png"]
    out = preprocess(png(image))
    assert out.shape == (192, 192, 3)
    assert abs_diff(out, torchvision_reference(image, spec)).max() <= 2


@pytest.mark.parametrize(
    ("resize", "crop"), [(223, 224), (100, 224)], ids=["one_short", "far_short"]
)
def test_resize_smaller_than_crop_is_refused(resize: int, crop: int) -> None:
    with pytest.raises(ValueError, match="must be at least crop"):
        ImagePreprocessor(PreprocessSpec(resize=resize, crop=crop), MAX_PIXELS)


def test_resize_equal_to_crop_is_allowed(photo_images: dict[str, Image.Image]) -> None:
    out = ImagePreprocessor(PreprocessSpec(resize=224, crop=224), MAX_PIXELS)(
        png(photo_images["chelsea.png"])
    )
    assert out.shape == (224, 224, 3)


# ---------------------------------------------------------------- EXIF orientation

# How a camera stores the upright picture for each EXIF orientation value (the viewer
# undoes it): 6 = "rotate 90° clockwise to view", so the pixels are stored turned 90°
# counter-clockwise.
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def tagged_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image.transpose(STORED_AS[orientation]), "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_is_applied(
    photo_images: dict[str, Image.Image], preprocess: ImagePreprocessor, orientation: int
) -> None:
    upright = photo_images["chelsea.png"]  # not square: a wrong turn changes the geometry
    expected = preprocess(encode(upright, "JPEG", quality=95))
    out = preprocess(tagged_jpeg(upright, orientation))
    assert abs_diff(out, expected).mean() < 3

    # The same stored pixels without the tag are a different picture: the bound above
    # does tell an applied orientation from an ignored one.
    untagged = encode(upright.transpose(STORED_AS[orientation]), "JPEG", quality=95)
    assert abs_diff(preprocess(untagged), expected).mean() > 10


# ---------------------------------------------------------------- modes and formats


def _gray16(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


MODES: dict[str, tuple[Callable[[Image.Image], bytes], str]] = {
    "L": (lambda image: png(image.convert("L")), "L"),
    "P": (lambda image: png(image.convert("P")), "P"),
    "RGBA": (lambda image: png(image.convert("RGBA")), "RGBA"),
    "LA": (lambda image: png(image.convert("LA")), "LA"),
    "1": (lambda image: png(image.convert("1")), "1"),
    "CMYK_jpeg": (lambda image: encode(image.convert("CMYK"), "JPEG", quality=95), "CMYK"),
    "L_jpeg": (lambda image: encode(image.convert("L"), "JPEG", quality=95), "L"),
    "I;16_png": (lambda image: png(_gray16(image)), "I;16"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_becomes_rgb_uint8(
    photo_images: dict[str, Image.Image], preprocess: ImagePreprocessor, mode: str
) -> None:
    make, opened_mode = MODES[mode]
    data = make(photo_images["chelsea.png"])
    assert Image.open(io.BytesIO(data)).mode == opened_mode  # the input is what it claims
    out = preprocess(data)
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8


def test_grayscale_becomes_three_equal_channels(
    photo_images: dict[str, Image.Image], preprocess: ImagePreprocessor
) -> None:
    gray = photo_images["chelsea.png"].convert("L")
    out = preprocess(png(gray))
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    expected = torchvision_reference(gray.convert("RGB"), DEFAULT_SPEC)
    assert abs_diff(out, expected).max() <= 2


def test_cmyk_jpeg_has_the_colours_of_the_rgb_image(
    photo_images: dict[str, Image.Image], preprocess: ImagePreprocessor
) -> None:
    image = photo_images["chelsea.png"]
    out = preprocess(encode(image.convert("CMYK"), "JPEG", quality=95))
    assert abs_diff(out, preprocess(png(image))).mean() < 3


def test_16_bit_grayscale_keeps_its_content(
    photo_images: dict[str, Image.Image], preprocess: ImagePreprocessor
) -> None:
    gray = photo_images["chelsea.png"].convert("L")
    out = preprocess(png(_gray16(gray)))
    assert abs_diff(out, preprocess(png(gray))).mean() < 1


@pytest.mark.parametrize(
    ("fmt", "save_args"),
    [("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {"optimize": True})],
)
def test_lossless_accepted_formats_decode_like_png(
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    fmt: str,
    save_args: dict[str, object],
) -> None:
    image = photo_images["coffee.png"]
    out = preprocess(encode(image, fmt, **save_args))
    assert np.array_equal(out, preprocess(png(image)))


# ---------------------------------------------------------------- JPEG draft decoding


@pytest.fixture(scope="module")
def large_photo(photo_images: dict[str, Image.Image]) -> Image.Image:
    return photo_images["coffee.png"].resize((4000, 3000), Image.Resampling.BICUBIC)


def test_large_jpeg_decoded_at_reduced_scale_matches_the_full_image(
    large_photo: Image.Image, preprocess: ImagePreprocessor
) -> None:
    from_jpeg = preprocess(encode(large_photo, "JPEG", quality=95))
    from_png = preprocess(png(large_photo))
    assert abs_diff(from_jpeg, from_png).mean() < 4
    # And both still agree with the reference on the full-size image.
    reference = torchvision_reference(large_photo, DEFAULT_SPEC)
    assert abs_diff(from_png, reference).mean() < 0.5


def _record_drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], object]]:
    """Record, for each JpegImageFile.draft call, the size it leaves and its return value."""
    calls: list[tuple[tuple[int, int], object]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> object:
        result = original(self, mode, size)
        calls.append((self.size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return calls


def test_large_jpeg_uses_draft_and_keeps_both_sides_at_least_resize(
    large_photo: Image.Image, preprocess: ImagePreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode(large_photo, "JPEG", quality=90)
    calls = _record_drafts(monkeypatch)
    preprocess(data)
    assert len(calls) == 1
    (width, height), result = calls[0]
    assert result is not None  # Pillow configured a reduced-scale decode
    assert (width, height) == (500, 375)  # 1/8 scale: the smallest that keeps >= 256
    assert min(width, height) >= DEFAULT_SPEC.resize


def test_draft_does_not_shrink_a_jpeg_below_resize(
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = photo_images["motorcycle_left.png"]  # 741x500: halving would leave 250 < 256
    data = encode(image, "JPEG", quality=95)
    calls = _record_drafts(monkeypatch)
    preprocess(data)
    assert [size for size, _ in calls] == [image.size]


def test_png_is_not_drafted(
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _record_drafts(monkeypatch)
    preprocess(png(photo_images["chelsea.png"]))
    assert calls == []


# ---------------------------------------------------------------- bad input


def _pillow_can_open(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return str(image.format)


BAD_INPUTS: dict[str, Callable[[dict[str, bytes], Image.Image], bytes]] = {
    "empty": lambda jpegs, image: b"",
    "random": lambda jpegs, image: np.random.default_rng(0).bytes(4096),
    "truncated_jpeg": lambda jpegs, image: jpegs["chelsea.png"][: len(jpegs["chelsea.png"]) // 2],
    "text": lambda jpegs, image: b"just some text, not an image\n" * 20,
    "svg": lambda jpegs, image: (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" '
        b'height="64"><rect width="64" height="64" fill="red"/></svg>'
    ),
    "pdf": lambda jpegs, image: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\n",
    "jpeg_magic_only": lambda jpegs, image: b"\xff\xd8\xff\xe0" + b"\x00" * 64,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_undecodable_input_is_invalid_image(
    photo_jpegs: dict[str, bytes],
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    case: str,
) -> None:
    data = BAD_INPUTS[case](photo_jpegs, photo_images["chelsea.png"])
    with pytest.raises(InvalidImage) as error:
        preprocess(data)
    assert error.value.status == 400
    assert error.value.code == "invalid_image"


@pytest.mark.parametrize(
    ("fmt", "save_args"),
    [("ICO", {}), ("PPM", {}), ("PCX", {}), ("TGA", {}), ("EPS", {})],
)
def test_formats_pillow_opens_but_we_do_not_accept_are_invalid(
    photo_images: dict[str, Image.Image],
    preprocess: ImagePreprocessor,
    fmt: str,
    save_args: dict[str, object],
) -> None:
    data = encode(photo_images["chelsea.png"], fmt, **save_args)
    if fmt != "EPS":  # reading EPS needs Ghostscript; the header alone identifies it
        assert _pillow_can_open(data) == fmt
    with pytest.raises(InvalidImage) as error:
        preprocess(data)
    assert error.value.code == "invalid_image"


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decode fail the test: the size check must come first."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {self.size} image that should have been refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (100_000, 100_000),  # beyond Pillow's own decompression-bomb limit
        (10_000, 10_000),  # between Pillow's warning and error limits
        (9_000, 9_000),  # under Pillow's limits: only ours applies
    ],
)
@pytest.mark.usefixtures("no_decoding")
def test_too_many_pixels_is_refused_from_the_header(width: int, height: int) -> None:
    with pytest.raises(ImageTooLarge) as error:
        ImagePreprocessor(DEFAULT_SPEC, MAX_PIXELS)(png_claiming(width, height))
    assert error.value.status == 413
    assert error.value.code == "image_too_large"


def test_claimed_header_is_otherwise_a_valid_png() -> None:
    # The forged header parses; only the pixel count is wrong with it.
    with Image.open(io.BytesIO(png_claiming(3000, 2000))) as image:
        assert image.format == "PNG"
        assert image.size == (3000, 2000)


def test_max_pixels_is_an_inclusive_limit(photo_images: dict[str, Image.Image]) -> None:
    image = photo_images["chelsea.png"]
    data = png(image)
    pixels = image.width * image.height
    assert ImagePreprocessor(DEFAULT_SPEC, pixels)(data).shape == (224, 224, 3)
    with pytest.raises(ImageTooLarge, match=f"{pixels} pixels"):
        ImagePreprocessor(DEFAULT_SPEC, pixels - 1)(data)


def test_jpeg_over_the_limit_is_refused(photo_jpegs: dict[str, bytes]) -> None:
    data = photo_jpegs["rocket.jpg"]
    with Image.open(io.BytesIO(data)) as image:
        pixels = image.width * image.height
    with pytest.raises(ImageTooLarge):
        ImagePreprocessor(DEFAULT_SPEC, pixels - 1)(data)


def test_formats_missing_from_this_pillow_build_are_not_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking Pillow for a format whose plugin is absent (AVIF before Pillow 11.2, or a
    build without libavif) made it raise KeyError on unrecognised bytes: a 500."""
    without_avif = {name: value for name, value in Image.OPEN.items() if name != "AVIF"}
    monkeypatch.setattr(Image, "OPEN", without_avif)
    monkeypatch.setattr(Image, "init", lambda: True)
    preprocess_module.accepted_formats.cache_clear()
    try:
        preprocessor = ImagePreprocessor(PreprocessSpec(), max_pixels=50_000_000)
        with pytest.raises(InvalidImage) as error:
            preprocessor(b"these bytes are no image in any format")
        assert "AVIF" not in error.value.message
    finally:
        preprocess_module.accepted_formats.cache_clear()


def test_decoding_never_touches_the_process_wide_warning_filters(
    monkeypatch: pytest.MonkeyPatch, photo_images: dict[str, Image.Image]
) -> None:
    """`warnings.catch_warnings` is not thread-safe and decoding runs on many threads:
    Pillow's own limit is set once instead, and a header between 1x and 2x Pillow's
    default limit (which would warn) passes our larger limit silently."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("catch_warnings used while decoding")

    data = png(photo_images["chelsea.png"])
    with monkeypatch.context() as patched:  # only around our calls: pytest uses it too
        patched.setattr(warnings, "catch_warnings", forbidden)
        preprocessor = ImagePreprocessor(PreprocessSpec(), max_pixels=200_000_000)
        assert preprocessor.check(png_claiming(12_000, 10_000)) == 120_000_000
        assert preprocessor(data).shape == (224, 224, 3)


def test_deep_images_are_scaled_exactly_to_8_bits() -> None:
    samples = np.array([[0, 257, 32767, 32896, 65535, 1000]], dtype=np.uint16)
    expected = np.rint(samples.astype(np.float64) / 65535 * 255).astype(np.uint8)
    converted = preprocess_module._to_8_bit(Image.fromarray(samples))
    assert converted.mode == "L"
    np.testing.assert_array_equal(np.asarray(converted), expected)
    floats = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    as_bytes = np.asarray(preprocess_module._to_8_bit(Image.fromarray(floats, "F")))
    np.testing.assert_array_equal(as_bytes, [[0, 64, 128, 255]])
