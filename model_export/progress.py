"""Progress lines for the long steps, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream or sys.stderr
        self._quiet = quiet

    def info(self, message: str) -> None:
        if not self._quiet:
            print(f"[resnet-export] {message}", file=self._stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"[resnet-export] WARNING: {message}", file=self._stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.info(f"{title} ...")
        started = time.perf_counter()
        yield
        self.info(f"{title}: done in {time.perf_counter() - started:.1f} s")
