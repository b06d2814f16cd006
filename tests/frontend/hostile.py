"""A corpus of hostile and malformed requests, generated here (nothing downloaded).

Each `HostileCase` builds its request for one input form (the raw image as the body,
multipart `files`, JSON base64) and one endpoint, and says what the service must answer:
a 4xx status with its error code, or 200 for the valid-but-odd images. `tests/frontend/test_hostile.py`
sends every case through every form and endpoint it applies to.

The expectations assume the server runs with `LIMITS`, small enough that the over-limit
cases stay cheap.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson
from PIL import Image, TiffImagePlugin

from tests.support import png_claiming

RAW = "raw"
MULTIPART = "multipart"
JSON = "json"
FORMS = (RAW, MULTIPART, JSON)
# The Open Inference Protocol's form: BYTES images with the binary tensor data extension,
# for /v2/models/{name}/infer (tests/frontend/test_v2.py sends the image cases through it).
V2 = "v2"
PREDICT = "/predict"
EMBED = "/embed"
ENDPOINTS = (PREDICT, EMBED)

LIMITS: dict[str, int] = {
    "max_body_bytes": 300_000,
    "max_images_per_request": 3,
    "max_image_pixels": 2_000_000,
    "max_request_pixels": 4_000_000,
}
BOUNDARY = "hostile-boundary-7f3a"
EXIF_ORIENTATION = 0x0112


@dataclass
class Request:
    """What to send: httpx's `content`, `headers` and `params`."""

    content: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    images: int = 1  # how many results a 200 must carry


Builder = Callable[[str, str], Request]  # (form, endpoint) -> request


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Builder
    status: int
    code: str | None = None  # the error code; None for a 200
    forms: tuple[str, ...] = FORMS
    endpoints: tuple[str, ...] = ENDPOINTS

    def __post_init__(self) -> None:
        assert (self.status == 200) == (self.code is None), self.name


# ------------------------------------------------------------------ images


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB picture with gradients, edges and noise (not a flat colour, so
    a wrong rotation or channel order changes the model's output)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    green = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    blue = (((x // 16 + y // 16) % 2) * 200).astype(np.uint8)
    pixels = np.stack([red, green, blue], axis=-1)
    noise = rng.integers(0, 24, size=pixels.shape, dtype=np.uint8)
    return np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def picture(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(textured(width, height, seed))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(width: int = 32, height: int = 32) -> bytes:
    return encode(picture(width, height), "PNG")


def flat(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A large picture in a small file (a flat colour): pixel limits, not body limits."""
    return encode(Image.new("RGB", (width, height), (90, 140, 200)), fmt)


def strip(width: int, height: int) -> bytes:
    """An extreme aspect ratio: a repeating ramp along the long side."""
    ramp = (np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)
    return encode(Image.fromarray(ramp).convert("RGB"), "PNG")


def jpeg(width: int = 96, height: int = 64, **options: object) -> bytes:
    return encode(picture(width, height), "JPEG", quality=90, **options)


def gif_claiming(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen claims `width` x `height`."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims `width` x `height`."""
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A small BMP whose info header claims `width` x `height`."""
    data = bytearray(encode(picture(4, 4), "BMP"))
    data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little", signed=True)
    return bytes(data)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data).to_bytes(4, "big")
    return len(data).to_bytes(4, "big") + kind + data + crc


def png_with_chunk_bomb(kind: bytes) -> bytes:
    """A 32x32 PNG carrying a compressed metadata chunk that inflates to 50 MB: an iCCP
    profile (read with the header) or a zTXt comment (read after the pixels)."""
    data = png()
    payload = b"name\x00\x00" + zlib.compress(b"\x00" * 50_000_000, 9)
    at = data.index(b"IDAT") - 4 if kind == b"iCCP" else data.rindex(b"IEND") - 4
    return data[:at] + png_chunk(kind, payload) + data[at:]


def mpo() -> bytes:
    """A multi-picture JPEG (what many phone cameras write)."""
    return encode(picture(), "MPO", save_all=True, append_images=[picture(seed=1)])


def png_bomb(side: int = 4000) -> bytes:
    """A real decompression bomb: `side`^2 black pixels deflate to a few kilobytes."""
    return encode(Image.new("L", (side, side)), "PNG", optimize=True)


def deep_grey_png() -> bytes:
    """16 bits a sample (mode I;16)."""
    ramp = (textured(64, 48)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def deep_tiff() -> bytes:
    ramp = (textured(64, 48)[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(ramp), "TIFF")


def float_tiff() -> bytes:
    values = textured(64, 48)[..., 2].astype(np.float32) / 255.0
    return encode(Image.fromarray(values), "TIFF")


def palette_png() -> bytes:
    image = picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def palette_gif() -> bytes:
    return encode(picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "GIF")


def cmyk(fmt: str) -> bytes:
    return encode(picture().convert("CMYK"), fmt)


def grey_jpeg() -> bytes:
    return encode(picture().convert("L"), "JPEG")


def bilevel_bmp() -> bytes:
    return encode(picture().convert("1"), "BMP")


def with_alpha(mode: str, fmt: str) -> bytes:
    image = picture().convert(mode)
    alpha = Image.linear_gradient("L").resize(image.size)
    image.putalpha(alpha)
    return encode(image, fmt)


def animated(fmt: str) -> bytes:
    frames = [picture(seed=seed) for seed in range(4)]
    if fmt == "GIF":
        frames = [frame.convert("P", palette=Image.Palette.ADAPTIVE) for frame in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)


def exif_rotated(upright: Image.Image, fmt: str = "JPEG", orientation: int = 6) -> bytes:
    """`upright`'s pixels stored rotated, with the EXIF orientation that undoes it: a
    viewer (and the service) must show the upright picture. Orientation 6 means "rotate
    90° clockwise to view", so the stored pixels are the upright ones turned 90° counter-
    clockwise."""
    stored = {
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    options: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        options["quality"] = 95
    return encode(stored, fmt, **options)


def bogus_orientation_jpeg() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 99
    return encode(picture(), "JPEG", exif=exif.tobytes())


def ppm() -> bytes:
    return encode(picture(), "PPM")


def ico() -> bytes:
    return encode(picture(), "ICO")


def tiff_with_huge_tag() -> bytes:
    """A valid TIFF carrying a 100 kB ImageDescription tag (metadata, not pixels)."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "x" * 100_000
    return encode(picture(), "TIFF", tiffinfo=info)


# ------------------------------------------------------------------ requests


def multipart(parts: Iterable[tuple[str, str | None, str | None, bytes]]) -> bytes:
    """A multipart/form-data body from (name, filename, content type, data) parts."""
    chunks = []
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        chunks.append(head.encode() + b"\r\n" + data + b"\r\n")
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def as_form(
    form: str,
    images: list[bytes],
    media: str = "image/png",
    fields: Mapping[str, object] | None = None,
) -> Request:
    """`images` (and any body `fields`) sent in `form`."""
    fields = dict(fields or {})
    if form == RAW:
        assert len(images) == 1, "a raw body carries one image"
        assert not fields, "a raw body carries no fields"
        return Request(images[0], {"content-type": media})
    if form == MULTIPART:
        parts = [("files", f"image{i}", media, data) for i, data in enumerate(images)]
        parts += [(name, None, None, str(value).encode()) for name, value in fields.items()]
        return Request(multipart(parts), {"content-type": MULTIPART_TYPE}, images=len(images))
    if form == JSON:
        document = {"images": [base64.b64encode(data).decode() for data in images], **fields}
        body = json.dumps(document).encode()  # not orjson: it refuses ints beyond 64 bits
        return Request(body, {"content-type": "application/json"}, images=len(images))
    if form == V2:
        assert not fields, "v2 parameters are not image-request fields"
        raw = b"".join(len(data).to_bytes(4, "little") + data for data in images)
        tensor = {"name": "image_bytes", "datatype": "BYTES", "shape": [len(images)]}
        header = orjson.dumps(
            {
                "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
            }
        )
        headers = {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        }
        return Request(header + raw, headers, images=len(images))
    raise ValueError(f"unknown form {form}")


def image_case(
    name: str,
    make: Callable[[], bytes],
    status: int = 200,
    code: str | None = None,
    media: str = "image/png",
) -> HostileCase:
    """One image, sent in every form to every endpoint."""
    made = functools.cache(make)  # some are slow to make (the bomb): once per corpus
    return HostileCase(name, lambda form, _endpoint: as_form(form, [made()], media), status, code)


def raw_case(name: str, content: Callable[[], bytes], headers: dict[str, str], status: int, code: str) -> HostileCase:  # fmt: skip
    return HostileCase(
        name, lambda _form, _endpoint: Request(content(), dict(headers)), status, code, (RAW,)
    )


def json_case(name: str, body: Callable[[], bytes], status: int, code: str | None = None) -> HostileCase:  # fmt: skip
    return HostileCase(
        name,
        lambda _form, _endpoint: Request(body(), {"content-type": "application/json"}),
        status,
        code,
        (JSON,),
    )


def json_images(images: list[str], **fields: object) -> Callable[[], bytes]:
    return lambda: orjson.dumps({"images": images, **fields})


def multipart_case(name: str, body: Callable[[], bytes], status: int, code: str) -> HostileCase:
    return HostileCase(
        name,
        lambda _form, _endpoint: Request(body(), {"content-type": MULTIPART_TYPE}),
        status,
        code,
        (MULTIPART,),
    )


def many(form: str, count: int, make: Callable[[], bytes] = png) -> Request:
    data = make()
    return as_form(form, [data] * count)


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body without a Content-Length: the server must cap it as it arrives."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def over_limit_chunked(_form: str, _endpoint: str) -> Request:
    return Request(chunked(b"\xff" * (LIMITS["max_body_bytes"] + 100_000)), {"content-type": "image/jpeg"})  # fmt: skip


def parameter_case(
    name: str, field_name: str, value: object, endpoint: str, status: int = 422
) -> list[HostileCase]:
    """A parameter given in the query string (every form) and as a body field (multipart,
    JSON: as its JSON type there)."""
    code = None if status == 200 else "invalid_parameter"

    def in_query(form: str, _endpoint: str) -> Request:
        request = as_form(form, [png()])
        text = value if isinstance(value, str) else json.dumps(value)
        request.params = {field_name: text}
        return request

    def in_body(form: str, _endpoint: str) -> Request:
        return as_form(form, [png()], fields={field_name: value})

    return [
        HostileCase(f"{name} (query)", in_query, status, code, FORMS, (endpoint,)),
        HostileCase(f"{name} (field)", in_body, status, code, (MULTIPART, JSON), (endpoint,)),
    ]


# ------------------------------------------------------------------ the corpus


def corpus() -> list[HostileCase]:
    """Every case, in a fixed order (the same corpus on every run)."""
    cases = [*image_cases(), *request_cases(), *parameter_cases()]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


BAD, TOO_LARGE, BAD_BODY, BAD_PARAM = "invalid_image", "image_too_large", "bad_request", "invalid_parameter"  # fmt: skip
MEDIA = "unsupported_media_type"


# fmt: off
def image_cases() -> list[HostileCase]:
    """One image each, in every form, to every endpoint."""
    return [
        # images that are not images, or broken ones
        image_case("empty image", lambda: b"", 400, BAD),
        image_case("random bytes", lambda: np.random.default_rng(1).bytes(4096), 400, BAD),
        image_case("text as image", lambda: b"hello, I am not a picture", 400, BAD),
        image_case("truncated jpeg", lambda: jpeg(320, 240)[:3000], 400, BAD, "image/jpeg"),
        image_case("jpeg header only", lambda: jpeg()[:20], 400, BAD, "image/jpeg"),
        image_case("truncated png", lambda: png(300, 300)[:500], 400, BAD),
        image_case("svg", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", 400, BAD),
        image_case("pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, BAD),
        image_case("ppm (format not accepted)", ppm, 400, BAD),
        image_case("ico (format not accepted)", ico, 400, BAD),
        # too many pixels: found from the header, before any decoding
        image_case("png bomb header 100000x100000", lambda: png_claiming(100_000, 100_000), 413, TOO_LARGE),
        image_case("png bomb header 2^31-1 square", lambda: png_claiming(2**31 - 1, 2**31 - 1), 413, TOO_LARGE),
        image_case("png deflate bomb 4000x4000", png_bomb, 413, TOO_LARGE),
        image_case("png iCCP chunk inflating to 50 MB", lambda: png_with_chunk_bomb(b"iCCP"), 400, BAD),
        image_case("png zTXt chunk inflating to 50 MB", lambda: png_with_chunk_bomb(b"zTXt"), 400, BAD),
        image_case("gif bomb header 65535x65535", lambda: gif_claiming(65535, 65535), 413, TOO_LARGE),
        image_case("jpeg bomb header 65500x65500", lambda: jpeg_claiming(65500, 65500), 413, TOO_LARGE, "image/jpeg"),
        image_case("bmp bomb header 50000x50000", lambda: bmp_claiming(50_000, 50_000), 413, TOO_LARGE, "image/bmp"),
        image_case("jpeg just over the pixel limit", lambda: flat(2001, 1000, "JPEG"), 413, TOO_LARGE, "image/jpeg"),
        # valid but odd: 200
        image_case("garbage after jpeg end marker", lambda: jpeg() + b"\x00garbage" * 500, media="image/jpeg"),
        image_case("16-bit grey png", deep_grey_png),
        image_case("16-bit tiff", deep_tiff, media="image/tiff"),
        image_case("float tiff", float_tiff, media="image/tiff"),
        image_case("tiff with a 100 kB tag", tiff_with_huge_tag, media="image/tiff"),
        image_case("palette png with transparency", palette_png),
        image_case("palette gif", palette_gif, media="image/gif"),
        image_case("cmyk jpeg", lambda: cmyk("JPEG"), media="image/jpeg"),
        image_case("cmyk tiff", lambda: cmyk("TIFF"), media="image/tiff"),
        image_case("grey jpeg", grey_jpeg, media="image/jpeg"),
        image_case("1-bit bmp", bilevel_bmp, media="image/bmp"),
        image_case("grey+alpha png", lambda: with_alpha("L", "PNG")),
        image_case("rgba png", lambda: with_alpha("RGB", "PNG")),
        image_case("rgba webp", lambda: with_alpha("RGB", "WEBP"), media="image/webp"),
        image_case("animated gif", lambda: animated("GIF"), media="image/gif"),
        image_case("animated png", lambda: animated("PNG")),
        image_case("animated webp", lambda: animated("WEBP"), media="image/webp"),
        image_case("exif-rotated jpeg", lambda: exif_rotated(picture()), media="image/jpeg"),
        image_case("exif orientation 99", bogus_orientation_jpeg, media="image/jpeg"),
        image_case("progressive jpeg", lambda: jpeg(progressive=True), media="image/jpeg"),
        image_case("mpo (multi-picture jpeg)", mpo, media="image/jpeg"),
        image_case("1x1 png", lambda: png(1, 1)),
        image_case("1x1 jpeg", lambda: jpeg(1, 1), media="image/jpeg"),
        image_case("100000x1 png", lambda: strip(100_000, 1)),
        image_case("1x100000 png", lambda: strip(1, 100_000)),
        image_case("png labelled image/jpeg", png, media="image/jpeg"),
        image_case("png as application/octet-stream", png, media="application/octet-stream"),
    ]


def request_cases() -> list[HostileCase]:
    """Bodies, media types, sizes and counts, base64, JSON and multipart gone wrong."""
    limit = LIMITS["max_body_bytes"]
    max_images = LIMITS["max_images_per_request"]
    good = png()
    good_b64 = base64.b64encode(good).decode()
    one_file = [("files", "a", "image/png", good)]
    long_name = "x" * 10_000
    return [
        # media types
        raw_case("no content-type", png, {}, 415, MEDIA),
        raw_case("text/plain", png, {"content-type": "text/plain"}, 415, MEDIA),
        raw_case("application/xml", png, {"content-type": "application/xml"}, 415, MEDIA),
        raw_case("image/svg+xml", png, {"content-type": "image/svg+xml"}, 415, MEDIA),
        raw_case("form-urlencoded", lambda: b"images=abc", {"content-type": "application/x-www-form-urlencoded"}, 415, MEDIA),
        raw_case("8 kB content-type", png, {"content-type": "image/" + "x" * 8000}, 415, MEDIA),
        raw_case("content-type of semicolons", png, {"content-type": ";;;"}, 415, MEDIA),
        raw_case("json body labelled image/png", json_images([good_b64]), {"content-type": "image/png"}, 400, BAD),
        raw_case("multipart body labelled json", lambda: multipart(one_file), {"content-type": "application/json"}, 400, BAD_BODY),
        raw_case("png labelled multipart", png, {"content-type": MULTIPART_TYPE}, 400, BAD_BODY),
        # empty bodies
        raw_case("empty raw body", lambda: b"", {"content-type": "image/jpeg"}, 400, BAD),
        json_case("empty json body", lambda: b"", 400, BAD_BODY),
        multipart_case("empty multipart body", lambda: b"", 400, BAD_BODY),
        # sizes and counts
        HostileCase("body over the limit", lambda form, _e: as_form(form, [b"\xff" * (limit + 1)]), 413, "payload_too_large"),
        HostileCase("body over the limit, chunked", over_limit_chunked, 413, "payload_too_large", (RAW,)),
        HostileCase("one image over the count limit", lambda form, _e: many(form, max_images + 1), 413, "too_many_images", (MULTIPART, JSON)),
        HostileCase("1000 images", lambda form, _e: many(form, 1000, lambda: b""), 413, "too_many_images", (MULTIPART, JSON)),
        HostileCase("images at the count limit", lambda form, _e: many(form, max_images), 200, None, (MULTIPART, JSON)),
        HostileCase("request pixels over the limit", lambda form, _e: many(form, 3, lambda: flat(1300, 1100)), 413, TOO_LARGE, (MULTIPART, JSON)),
        HostileCase("one bad image among good ones", lambda form, _e: as_form(form, [good, b"junk", good]), 400, BAD, (MULTIPART, JSON)),
        # base64 (the service never fetches a URL: it is just invalid base64)
        json_case("invalid base64", json_images(["@@@@"]), 400, BAD),
        json_case("base64 without padding", json_images([good_b64.rstrip("=") + "A"]), 400, BAD),
        json_case("url-safe base64 alphabet", json_images([good_b64.replace("+", "-").replace("/", "_") + "-_"]), 400, BAD),
        json_case("base64 with line breaks", json_images([good_b64[:40] + "\n" + good_b64[40:]]), 400, BAD),
        json_case("non-ascii base64", json_images(["ümlaut" * 10]), 400, BAD),
        json_case("100 kB of invalid base64", json_images(["!" * 100_000]), 400, BAD),
        json_case("an http url instead of base64", json_images(["http://127.0.0.1:9/cat.jpg"]), 400, BAD),
        json_case("data url with invalid base64", json_images(["data:image/png;base64,@@@"]), 400, BAD),
        json_case("data url", json_images([f"data:image/png;base64,{good_b64}"]), 200),
        json_case("base64 of garbage", json_images([base64.b64encode(b"nope" * 10).decode()]), 400, BAD),
        json_case("100 kB string of base64 letters", json_images(["x" * 100_000]), 400, BAD),
        # JSON that is not the expected object
        json_case("json array", lambda: b"[1, 2]", 422, BAD_PARAM),
        json_case("json string", lambda: b'"images"', 422, BAD_PARAM),
        json_case("json number", lambda: b"42", 422, BAD_PARAM),
        json_case("json null", lambda: b"null", 422, BAD_PARAM),
        json_case("json object without images", lambda: b'{"top_k": 3}', 422, BAD_PARAM),
        json_case("images not a list", lambda: orjson.dumps({"images": good_b64}), 422, BAD_PARAM),
        json_case("images of numbers", lambda: b'{"images": [1, 2]}', 422, BAD_PARAM),
        json_case("images of nulls", lambda: b'{"images": [null]}', 422, BAD_PARAM),
        json_case("images an empty list", json_images([]), 422, BAD_PARAM),
        json_case("malformed json", lambda: b"{not json", 400, BAD_BODY),
        json_case("truncated json", lambda: orjson.dumps({"images": [good_b64]})[:-10], 400, BAD_BODY),
        json_case("json nested 100000 deep", lambda: b"[" * 100_000 + b"]" * 100_000, 400, BAD_BODY),
        json_case("json with invalid utf-8", lambda: b'{"images": ["\xff\xfe"]}', 400, BAD_BODY),
        json_case("json NaN", lambda: b'{"images": [], "top_k": NaN}', 400, BAD_BODY),
        # broken multipart
        raw_case("multipart without boundary", lambda: multipart(one_file), {"content-type": "multipart/form-data"}, 400, BAD_BODY),
        raw_case("multipart with another boundary", lambda: multipart(one_file), {"content-type": "multipart/form-data; boundary=other"}, 400, BAD_BODY),
        multipart_case("multipart without closing boundary", lambda: multipart(one_file).rsplit(b"--" + BOUNDARY.encode() + b"--", 1)[0], 400, BAD_BODY),
        multipart_case("multipart cut in a part", lambda: multipart(one_file)[:-60], 400, BAD_BODY),
        multipart_case("multipart header without colon", lambda: f"--{BOUNDARY}\r\nnocolon\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode(), 400, BAD_BODY),
        multipart_case("multipart garbage before the first boundary", lambda: b"garbage\r\n" + multipart(one_file), 400, BAD_BODY),
        multipart_case("multipart field with a 10 kB name", lambda: multipart([*one_file, (long_name, None, None, b"1")]), 400, BAD_BODY),
        multipart_case("multipart file field not named files", lambda: multipart([("image", "a", "image/png", good)]), 422, BAD_PARAM),
        multipart_case("multipart field over 1 kB", lambda: multipart([*one_file, ("top_k", None, None, b"1" * 5000)]), 422, BAD_PARAM),
        multipart_case("multipart without files", lambda: multipart([("top_k", None, None, b"3")]), 422, BAD_PARAM),
        multipart_case("multipart unnamed part", lambda: f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\n".encode() + good + f"\r\n--{BOUNDARY}--\r\n".encode(), 422, BAD_PARAM),
        # unknown fields in the body (extra query parameters are ignored, as usual)
        json_case("unknown field with a 10 kB name", json_images([good_b64], **{long_name: 1}), 422, BAD_PARAM),
        HostileCase("unknown field", lambda form, _e: as_form(form, [good], fields={"topk": 1}), 422, BAD_PARAM, (MULTIPART, JSON)),
        HostileCase("500 unknown fields", lambda form, _e: as_form(form, [good], fields={f"f{i}": i for i in range(500)}), 422, BAD_PARAM, (MULTIPART, JSON)),
        HostileCase("top_k sent to /embed", lambda form, _e: as_form(form, [good], fields={"top_k": 1}), 422, BAD_PARAM, (MULTIPART, JSON), (EMBED,)),
    ]
# fmt: on


def parameter_cases() -> list[HostileCase]:
    """top_k on /predict; normalize and encoding on /embed."""
    cases = []
    for value in (0, -1, 10**9, "abc", 1.5, True, "", 10**30):
        cases += parameter_case(f"top_k={value!r}", "top_k", value, PREDICT)
    for name, value in (("normalize", "maybe"), ("normalize", 2), ("encoding", "xml"), ("encoding", "JSON")):  # fmt: skip
        cases += parameter_case(f"{name}={value!r}", name, value, EMBED)
    cases += parameter_case("top_k=1", "top_k", 1, PREDICT, status=200)
    null = orjson.dumps({"images": [base64.b64encode(png()).decode()], "top_k": None})
    as_json = {"content-type": "application/json"}
    cases.append(HostileCase("top_k=null in json (the default)", lambda _f, _e: Request(null, as_json), 200, None, (JSON,), (PREDICT,)))  # fmt: skip
    return cases


def expand(cases: list[HostileCase]) -> list[tuple[HostileCase, str, str]]:
    """Every (case, form, endpoint) to send."""
    return [
        (case, form, endpoint)
        for case in cases
        for form in case.forms
        for endpoint in case.endpoints
    ]
