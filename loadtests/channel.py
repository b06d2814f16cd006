"""`python -m loadtests.channel`: the channel's transport chosen by measurement.

Round trips of a small msgspec message (the size of a `Submit`) between two processes,
over asyncio Unix-socket streams with a 4-byte length prefix (what service/channel uses)
and over pyzmq DEALER/ROUTER on ipc:// with its asyncio integration. Reported: the
median round trip with one message in flight, and the throughput and the client's CPU
per message with 64 in flight. Each transport is measured twice, alternating.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable

import msgspec


class Message(msgspec.Struct, array_like=True):
    id: int
    slot: int
    deadline: float
    outputs: int


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
MESSAGES = 20_000
HEADER = struct.Struct("<I")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _unix_echo(path: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError:
                return
            body = await reader.readexactly(HEADER.unpack(head)[0])
            out = encoder.encode(decoder.decode(body))
            writer.write(HEADER.pack(len(out)) + out)

    server = await asyncio.start_unix_server(handle, path)
    async with server:
        await server.serve_forever()


async def _zmq_echo(address: str) -> None:
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context().socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        identity, body = await sock.recv_multipart()
        await sock.send_multipart([identity, encoder.encode(decoder.decode(body))])


def _echo(kind: str, address: str) -> None:
    asyncio.run(_unix_echo(address) if kind == "unix" else _zmq_echo(address))


Send = Callable[[int], Awaitable[None]]


async def _unix_client(path: str) -> tuple[Send, asyncio.Task[None]]:
    reader, writer = await asyncio.open_unix_connection(path)
    pending: dict[int, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            head = await reader.readexactly(HEADER.size)
            message = decoder.decode(await reader.readexactly(HEADER.unpack(head)[0]))
            pending.pop(message.id).set_result(None)

    async def send(index: int) -> None:
        pending[index] = asyncio.get_running_loop().create_future()
        out = encoder.encode(Message(index, 3, 1.5, 1))
        writer.write(HEADER.pack(len(out)) + out)
        await pending[index]

    return send, asyncio.create_task(read())


async def _zmq_client(address: str) -> tuple[Send, asyncio.Task[None]]:
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.connect(address)
    pending: dict[int, asyncio.Future[None]] = {}

    async def read() -> None:
        while True:
            message = decoder.decode(await sock.recv())
            pending.pop(message.id).set_result(None)

    async def send(index: int) -> None:
        pending[index] = asyncio.get_running_loop().create_future()
        await sock.send(encoder.encode(Message(index, 3, 1.5, 1)))
        await pending[index]

    return send, asyncio.create_task(read())


async def _measure(kind: str, address: str) -> tuple[float, float, float]:
    send, reader = await (_unix_client(address) if kind == "unix" else _zmq_client(address))
    for index in range(200):
        await send(-index - 1)
    latencies = []
    for index in range(2000):
        started = time.perf_counter()
        await send(index)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    cpu, started = _cpu_s(), time.perf_counter()
    limit = asyncio.Semaphore(64)

    async def limited(index: int) -> None:
        async with limit:
            await send(index)

    await asyncio.gather(*(limited(10_000 + index) for index in range(MESSAGES)))
    elapsed = time.perf_counter() - started
    reader.cancel()
    return (
        latencies[len(latencies) // 2] * 1e6,
        MESSAGES / elapsed,
        (_cpu_s() - cpu) / MESSAGES * 1e6,
    )


def main() -> int:
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp()
    for round_index, kind in enumerate(("unix", "zmq", "unix", "zmq")):
        address = (
            os.path.join(directory, f"echo{round_index}.sock")
            if kind == "unix"
            else f"ipc://{directory}/zmq{round_index}"
        )
        echo = context.Process(target=_echo, args=(kind, address), daemon=True)
        echo.start()
        time.sleep(1.5)
        median_us, rate, cpu_us = asyncio.run(_measure(kind, address))
        print(
            f"{kind:5s} round trip median {median_us:6.1f} us | 64 in flight: "
            f"{rate:8.0f} msg/s, client CPU {cpu_us:5.1f} us/msg",
            flush=True,
        )
        echo.terminate()
        echo.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
