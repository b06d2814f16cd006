"""Open Inference Protocol (KServe v2) tensors, whatever the transport.

The protocol-neutral request and response objects that the HTTP and gRPC front ends both
build and read, the datatypes, and the two encodings of a tensor's data: JSON (numbers
as flat or nested lists; BYTES elements as base64 strings, since JSON strings must be
UTF-8 and images are not) and raw little-endian bytes (the binary tensor data extension
over HTTP, `raw_input_contents` over gRPC), where each BYTES element is a 4-byte
little-endian length followed by its bytes. Every malformed tensor is a 400 whose
message names it.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest, shown

BYTES = "BYTES"
# Datatype → little-endian numpy dtype (the wire's byte order).
NUMERIC: dict[str, np.dtype[Any]] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
    }.items()
}
DATATYPES = frozenset({*NUMERIC, BYTES})
_LENGTH = struct.Struct("<I")

Data = np.ndarray | list[bytes]  # numeric tensors as arrays, BYTES as a flat list


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: Data


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's default
    classification: int = 0  # > 0: the top k classes as "score:index:label" strings


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: every output
    id: str = ""
    binary_outputs: bool = False  # the default for outputs that do not say


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: Data
    binary: bool = False

    def raw(self) -> bytes:
        """The data as the wire's raw bytes."""
        if isinstance(self.data, list):
            return serialize_bytes(self.data)
        return np.ascontiguousarray(self.data, dtype=NUMERIC[self.datatype]).tobytes()


def element_count(shape: list[int]) -> int:
    return math.prod(shape)


def check_tensor_header(
    name: object, datatype: object, shape: object
) -> tuple[str, str, list[int]]:
    """Name, datatype and shape of a tensor as sent: well-formed, or a 400 naming it."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"every input needs a 'name' string; got {shown(name)}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(
            f"input '{name}': unknown datatype {shown(datatype)}; "
            f"one of {', '.join(sorted(DATATYPES))}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise BadRequest(
            f"input '{name}': 'shape' must be a list of non-negative integers; got {shown(shape)}"
        )
    return name, datatype, shape


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def deserialize_bytes(name: str, raw: bytes | memoryview) -> list[bytes]:
    """BYTES elements from length-prefixed raw data."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"input '{name}': BYTES data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(f"input '{name}': a BYTES element runs past the end of its data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> InputTensor:
    """A tensor from its raw bytes (binary extension, `raw_input_contents`)."""
    count = element_count(shape)
    if datatype == BYTES:
        elements = deserialize_bytes(name, raw)
        if len(elements) != count:
            raise BadRequest(
                f"input '{name}': shape {shape} holds {count} element(s); the data has "
                f"{len(elements)}"
            )
        return InputTensor(name, datatype, shape, elements)
    dtype = NUMERIC[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input '{name}': shape {shape} of {datatype} takes {count * dtype.itemsize} "
            f"bytes; the data has {len(raw)}"
        )
    return InputTensor(name, datatype, shape, np.frombuffer(raw, dtype).reshape(shape))


def tensor_from_json(name: str, datatype: str, shape: list[int], data: object) -> InputTensor:
    """A tensor from its JSON `data` (flat or nested as the shape, row-major)."""
    count = element_count(shape)
    if datatype == BYTES:
        elements = [_from_base64(name, item) for item in _flatten(name, data)]
        if len(elements) != count:
            raise BadRequest(
                f"input '{name}': shape {shape} holds {count} element(s); 'data' has "
                f"{len(elements)}"
            )
        return InputTensor(name, datatype, shape, elements)
    values = _flatten(name, data)
    if len(values) != count:
        raise BadRequest(
            f"input '{name}': shape {shape} holds {count} element(s); 'data' has {len(values)}"
        )
    dtype = NUMERIC[datatype]
    if not all(isinstance(value, int | float) for value in values):
        raise BadRequest(f"input '{name}': 'data' of a {datatype} tensor must hold numbers")
    if dtype.kind in "ui":
        limits = np.iinfo(dtype)
        if not all(
            isinstance(value, int) and limits.min <= value <= limits.max for value in values
        ):
            raise BadRequest(
                f"input '{name}': every {datatype} value must be an integer from "
                f"{limits.min} to {limits.max}"
            )
    return InputTensor(name, datatype, shape, np.asarray(values, dtype).reshape(shape))


def _flatten(name: str, data: object) -> list[object]:
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}': 'data' must be a list; got {shown(data)}")
    flat: list[object] = []
    pending = [iter(data)]
    while pending:  # iterative: a deeply nested list cannot exhaust the stack
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
        else:
            pending.pop()
    return flat


def _from_base64(name: str, item: object) -> bytes:
    if not isinstance(item, str):
        raise BadRequest(
            f"input '{name}': BYTES elements in JSON must be base64 strings; got {shown(item)}"
        )
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(
            f"input '{name}': a BYTES element is not valid base64 (send images base64 "
            "encoded in JSON, or raw with the binary tensor data extension)"
        ) from exc
