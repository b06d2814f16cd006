"""The server as production runs it, `python -m service.cli`, for the process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtests.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
JPEG = {"content-type": "image/jpeg"}


@contextmanager
def multi_process_server(
    package: Path, *flags: str, workers: int | None = 2
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The server with `workers` front-ends (None: `--workers` unset, the server chooses);
    yields it (output on a pipe) and its URL. Checks that /dev/shm is as it was once the
    server has gone."""
    shm_before = set(os.listdir("/dev/shm"))
    port = free_port()
    chosen = [] if workers is None else ["--workers", str(workers)]
    command = [
        sys.executable, "-m", "service.cli",
        "--model-dir", str(package), "--port", str(port), *chosen, *flags,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        try:
            wait_ready(process, port, 90, "its output follows")
        except RuntimeError as exc:
            process.kill()
            raise AssertionError(f"{exc}:\n{process.communicate()[0]}") from exc
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    assert set(os.listdir("/dev/shm")) == shm_before
