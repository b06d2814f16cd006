"""The front-end's listening socket: connections it accepts must not wait on Nagle.

Without TCP_NODELAY a response written as headers, then body, holds the body until the
client acknowledges the headers, and clients delay that ACK by 40 ms: every lone request
on the multi-process server took 68-72 ms instead of 25 before the fix."""

from __future__ import annotations

import asyncio
import socket

from service.frontend.process import listening_socket


def test_connections_accepted_by_a_front_end_send_without_delay() -> None:
    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)  # as uvicorn
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
            return nodelay
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) != 0
