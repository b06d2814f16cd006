"""`python -m loadtests.spread`: how keep-alive connections spread over front-end
processes on one port: one inherited listening socket, or one SO_REUSEPORT socket each.

A keep-alive connection stays with the process that accepted it, so a burst of clients
that connect at once decides the split for as long as they stay. Each trial opens
`--connections` connections together to N minimal uvicorn workers and counts those each
worker accepted; reported: the largest share's multiple of the even share, per trial.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import socket
import statistics
import time
from typing import Any

import uvicorn


async def _pid_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _listener(port: int, reuseport: bool, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(2048)
    return sock


def _serve(inherited: socket.socket | None, port: int) -> None:
    sock = inherited if inherited is not None else _listener(port, reuseport=True)
    config = uvicorn.Config(_pid_app, log_level="error", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


async def _burst(port: int, connections: int) -> list[str]:
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: spread\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        pid = (await reader.readexactly(length)).decode()
        writer.close()
        return pid

    return await asyncio.gather(*(one() for _ in range(connections)))


def measure(workers: int, reuseport: bool, connections: int, trials: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    holder = _listener(0, reuseport, listen=not reuseport)
    port = holder.getsockname()[1]
    processes = [
        context.Process(target=_serve, args=(None if reuseport else holder, port), daemon=True)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    time.sleep(3)
    shares = []
    try:
        for _ in range(trials):
            counts = collections.Counter(asyncio.run(_burst(port, connections)))
            shares.append(max(counts.values()) / (connections / workers))
    finally:
        for process in processes:
            process.terminate()
            process.join(10)
        holder.close()
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.spread", description=__doc__)
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args(argv)
    for workers in (int(n) for n in args.workers.split(",")):
        for reuseport in (False, True):
            shares = measure(workers, reuseport, args.connections, args.trials)
            name = "SO_REUSEPORT socket each" if reuseport else "one inherited socket"
            print(
                f"{workers} workers, {name:24s}: largest share / even share: median "
                f"{statistics.median(shares):.2f}, worst {max(shares):.2f} "
                f"({args.trials} bursts of {args.connections})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
