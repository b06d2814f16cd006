"""Start servers as separate processes for the benchmark (`resnet-serve`, the naive
baseline), and stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(process: subprocess.Popen[Any], port: int, timeout_s: float, hint: str) -> None:
    """Poll /readyz (bounded) until 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited early; {hint}")
            try:
                if http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout_s} s; {hint}")
            time.sleep(0.1)


@contextmanager
def running_process(
    command: list[str], port: int, log_path: Path, timeout_s: float = 120, cwd: Path | None = None
) -> Iterator[tuple[str, int, int]]:
    """Start a server process; yields (host, port, pid) once /readyz answers 200, and
    stops it (SIGTERM, then SIGKILL) on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ, cwd=cwd
        )
        try:
            wait_ready(process, port, timeout_s, f"see {log_path}")
            yield "127.0.0.1", port, process.pid
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def running_server(
    model_dir: Path,
    precision: str,
    extra_args: list[str],
    log_path: Path,
    timeout_s: float = 120,
    cwd: Path | None = None,
    prefix: list[str] | None = None,
) -> contextlib.AbstractContextManager[tuple[str, int, int]]:
    """`resnet-serve` (from `cwd`'s checkout when given, e.g. an older commit to compare;
    behind `prefix` when given, e.g. `taskset -c 0`)."""
    port = free_port()
    command = [
        *(prefix or []),
        sys.executable, "-m", "service.cli",
        "--model-dir", str(Path(model_dir).resolve()),
        "--precision", precision,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "warning",
        *extra_args,
    ]  # fmt: skip
    return running_process(command, port, log_path, timeout_s, cwd)


def running_naive(
    model_dir: Path, precision: str, log_path: Path, timeout_s: float = 120
) -> contextlib.AbstractContextManager[tuple[str, int, int]]:
    """The naive baseline server (loadtests/naive.py) on the same package."""
    port = free_port()
    command = [
        sys.executable, "-m", "loadtests.naive",
        "--model-dir", str(model_dir),
        "--precision", precision,
        "--port", str(port),
    ]  # fmt: skip
    return running_process(command, port, log_path, timeout_s)
