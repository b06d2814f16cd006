"""The wire format between the front-ends and the engine: every message, in one place.

Small messages only: a request's pixels or encoded bytes, and its outputs, travel through
the front-end's shared-memory arena (service/channel/arena.py); a message carries their
offsets. Each message is a msgspec struct, encoded as MessagePack (never pickled: a
front-end cannot make the engine run code) and framed by a 4-byte little-endian length
over a Unix stream socket. asyncio Unix sockets measured better than pyzmq for this
(loadtests/channel.py, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

from service.engine_api import EngineInfo

HEADER = struct.Struct("<I")
MAX_FRAME = 64 * 1024 * 1024  # messages are small; anything near this is a bug or an attack

# Item kinds: what an item's bytes in the arena are.
PIXELS = 0  # uint8 [H, W, 3], decoded by the front-end
ENCODED = 1  # an encoded image, decoded by the engine

# Output bits of `Submit.outputs`.
WANT_LOGITS = 1
WANT_EMBEDDING = 2


class Item(msgspec.Struct, array_like=True, frozen=True):
    kind: int
    offset: int  # of the input in the sender's arena
    length: int
    out_offset: int  # where the engine writes this image's outputs (logits, then embedding)


class ItemResult(msgspec.Struct, array_like=True, frozen=True):
    """One image's outcome. `status` 0: the outputs are in the arena; otherwise the error
    (`code`, `message`, `headers`) the front-end raises for this image."""

    status: int = 0
    queued_s: float = 0.0
    infer_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0
    code: str = ""
    message: str = ""
    headers: dict[str, str] = {}


# ---------------------------------------------------------------- front-end → engine


class Hello(msgspec.Struct, tag=True, frozen=True):
    """The first message on a connection; the arena's file descriptor comes with it."""

    slot: int  # this front-end's entry in the shared admission counters
    pid: int
    arena_bytes: int


class Submit(msgspec.Struct, tag=True, frozen=True):
    id: int
    deadline: float  # time.monotonic() (one clock for every process of the host)
    outputs: int  # WANT_* bits
    items: list[Item]


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """Nobody waits for request `id` any more: skip what is still queued."""

    id: int


class Ping(msgspec.Struct, tag=True, frozen=True):
    id: int


class Collect(msgspec.Struct, tag=True, frozen=True):
    """Front-end → engine: a scrape wants the whole server's metrics. Engine → front-end:
    send your own (`Samples`)."""

    id: int


class Samples(msgspec.Struct, tag=True, frozen=True):
    """Metric families (service/observability/aggregate.py's plain form)."""

    id: int
    families: list[Any]


# ---------------------------------------------------------------- engine → front-end


class EngineStatus(msgspec.Struct, tag=True, frozen=True):
    """Sent on connecting and whenever the engine's state changes."""

    state: str  # EngineState
    info: EngineInfo | None = None
    frontends: int = 0  # front-ends connected when this was sent
    pid: int = 0  # the engine process


class Result(msgspec.Struct, tag=True, frozen=True):
    """The one answer to a `Submit`, once the engine will touch its arena block no more
    (also after a `Cancel`): only then may the front-end reuse the block."""

    id: int
    items: list[ItemResult]


class Pong(msgspec.Struct, tag=True, frozen=True):
    id: int


class Metrics(msgspec.Struct, tag=True, frozen=True):
    """The whole server's metric families, merged: the answer to a front-end's `Collect`."""

    id: int
    families: list[Any]


ToEngine = Hello | Submit | Cancel | Ping | Collect | Samples
ToFrontend = EngineStatus | Result | Pong | Metrics | Collect

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_frontend = msgspec.msgpack.Decoder(ToFrontend)


class ProtocolError(Exception):
    """The peer sent something that is not a message of this format."""


def frame(message: ToEngine | ToFrontend) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def decode_for_engine(body: bytes) -> ToEngine:
    try:
        return _to_engine.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from exc


def decode_for_frontend(body: bytes) -> ToFrontend:
    try:
        return _to_frontend.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from exc


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next message's body, or None once the peer has closed the connection."""
    try:
        header = await reader.readexactly(HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes")
    try:
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
