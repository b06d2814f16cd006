"""Request bodies → a list of encoded images and the parameters sent with them.

Three ways to send images, all to the same endpoints:
- the raw bytes of one image as the body (`Content-Type: image/jpeg`, `image/png`, ...);
- `multipart/form-data` with one or more files in a repeatable field named `files`
  (other form fields, like `top_k`, are parameters);
- JSON: `{"images": ["<base64>", ...], "top_k": 3}`.

The body is read with its size capped and its bytes counted against a shared budget
(`Lease`), and multipart is parsed in memory: bodies are bounded, and spooling uploads to
temporary files would only cost time.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import (
    BadRequest,
    ClientClosedRequest,
    InvalidImage,
    InvalidParameter,
    PayloadTooLarge,
    TooBusy,
    TooManyImages,
    UnsupportedMediaType,
    clipped,
    shown,
)
from service.frontend.limits import Lease

RAW_IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
        "image/avif",
        "application/octet-stream",
    }
)
FILES_FIELD = "files"
_MAX_FIELD_BYTES = 1024


@dataclass
class Payload:
    images: list[bytes]
    fields: dict[str, object] = field(default_factory=dict)


async def read_body(
    stream: AsyncIterator[bytes], content_length: str | None, max_bytes: int, lease: Lease
) -> bytes:
    """The whole body, refusing as soon as it is known to exceed `max_bytes` (413) or the
    budget shared by all requests in progress (429: before any of it is read when the
    length is declared). A client that disconnects midway is a 499, not a fault."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise BadRequest("the Content-Length header is not a number") from exc
        if declared > max_bytes:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_bytes}")
        if not lease.grow_to(declared):
            raise _too_busy()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes")
            if not lease.grow_to(size):
                raise _too_busy()
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientClosedRequest() from exc
    return b"".join(chunks)


def _too_busy() -> TooBusy:
    return TooBusy("requests in progress hold as much request data as the server allows; retry")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_payload(content_type: str | None, body: bytes, max_images: int) -> Payload:
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(
            "the request has no Content-Type; send an image type (image/jpeg, ...), "
            "multipart/form-data with a 'files' field, or application/json"
        )
    if kind in RAW_IMAGE_TYPES:
        payload = Payload([body])
    elif kind == "multipart/form-data":
        payload = _parse_multipart(content_type or "", body, max_images)
    elif kind == "application/json" or kind.endswith("+json"):
        payload = _parse_json(body, max_images)
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {shown(kind)}; send an image type (image/jpeg, image/png, "
            "image/webp, ...), multipart/form-data or application/json"
        )
    if not payload.images:
        raise InvalidParameter("the request carries no images")
    if len(payload.images) > max_images:
        raise TooManyImages(
            f"the request carries {len(payload.images)} images; the limit is {max_images}"
        )
    return payload


def _parse_json(body: bytes, max_images: int) -> Payload:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {clipped(exc)}") from exc
    if not isinstance(document, dict):
        raise InvalidParameter('the JSON body must be an object: {"images": ["<base64>", ...]}')
    images = document.pop("images", None)
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise InvalidParameter('"images" must be a list of base64-encoded image strings')
    if len(images) > max_images:
        raise TooManyImages(f"the request carries {len(images)} images; the limit is {max_images}")
    decoded = []
    for index, text in enumerate(images):
        if text.startswith("data:"):  # a data URL: data:image/png;base64,....
            text = text.partition(",")[2]
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidImage(f"images[{index}] is not valid base64: {clipped(exc)}") from exc
    return Payload(decoded, document)


class _MultipartCollector:
    """Callbacks for python-multipart's streaming parser, keeping parts in memory."""

    def __init__(self, max_files: int) -> None:
        self.files: list[bytes] = []
        self.fields: dict[str, object] = {}
        self._max_files = max_files
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def on_part_end(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILES_FIELD or b"filename" in options:
            if name != FILES_FIELD:
                raise InvalidParameter(
                    f"multipart file field {shown(name)} is not recognised; name it {FILES_FIELD!r}"
                )
            self.files.append(bytes(self._data))
            if len(self.files) > self._max_files:
                raise TooManyImages(f"the request carries more than {self._max_files} images")
        elif len(self._data) <= _MAX_FIELD_BYTES:
            self.fields[name] = self._data.decode("utf-8", "replace")
        else:
            raise InvalidParameter(
                f"form field {shown(name)} is longer than {_MAX_FIELD_BYTES} bytes"
            )


def _parse_multipart(content_type: str, body: bytes, max_images: int) -> Payload:
    _, options = parse_options_header(content_type.encode("latin-1", "replace"))
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    collector = _MultipartCollector(max_images)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart body: {clipped(exc)}") from exc
    # python-multipart's finalize() does not check that the body was complete: a body cut
    # short (or empty) would otherwise pass as one with fewer parts, or none.
    if parser.state != MultipartState.END:
        raise BadRequest("malformed multipart body: it ends before its closing boundary")
    return Payload(collector.files, collector.fields)
