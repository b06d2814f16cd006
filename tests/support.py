"""Test helpers: a real uvicorn server on 127.0.0.1 in a thread, and engine test doubles."""

from __future__ import annotations

import asyncio
import functools
import io
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.config import Settings
from service.model_package import ModelPackage, Precision


class _ThreadServer(uvicorn.Server):
    """uvicorn.Server that signals a threading.Event once it listens (or gives up)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        finally:
            self.listening.set()


@contextmanager
def running_server(
    app: FastAPI, timeout_s: float = 60.0, wait_loaded: bool = True, **options: Any
) -> Iterator[str]:
    """Serve `app` with uvicorn on an ephemeral 127.0.0.1 port; yields the base URL.

    With `wait_loaded`, returns once the model has loaded (or failed to). `options` go to
    `uvicorn.Config` (e.g. `http=` for the service's own protocol class).
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        log_config=None,
        **options,
    )
    server = _ThreadServer(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    if not server.listening.wait(timeout_s) or not server.started:
        server.should_exit = True
        raise RuntimeError("uvicorn did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    if wait_loaded:
        assert server.loop is not None
        loaded = asyncio.run_coroutine_threadsafe(app.state.runtime.wait_loaded(), server.loop)
        loaded.result(timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


@dataclass
class FakeEngine:
    """Deterministic, controllable stand-in for the ONNX Runtime engine.

    logits[i] = the image's mean pixel value per class offset, so each image's answer is
    recognisable; `gate` (when set) makes every run wait until the test opens it.
    """

    num_classes: int
    embedding_dim: int = 8
    providers: list[str] = field(default_factory=lambda: ["FakeExecutionProvider"])
    providers_requested: list[str] = field(default_factory=lambda: ["FakeExecutionProvider"])
    device: str = "cpu"
    runtime: str = "fake"
    runtime_version: str = "0"
    has_solo_session: bool = False
    batches: list[np.ndarray] = field(default_factory=list)
    alone: list[bool] = field(default_factory=list)  # of each batch: whether it ran alone
    gate: threading.Event | None = None
    running: threading.Event = field(default_factory=threading.Event)
    fail_when: object = None  # a callable(batch) -> bool: raise for such batches

    def run(self, batch: np.ndarray, alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(batch.copy())
        self.alone.append(alone)
        self.running.set()
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("test gate never opened")
        if callable(self.fail_when) and self.fail_when(batch):
            raise RuntimeError("injected engine failure")
        means = batch.reshape(batch.shape[0], -1).mean(axis=1, dtype=np.float64)
        logits = np.outer(means, np.ones(self.num_classes)) + np.arange(self.num_classes)
        embedding = np.outer(means, np.arange(1, self.embedding_dim + 1))
        return logits.astype(np.float32), embedding.astype(np.float32)

    def warm_up(self, batch_sizes: list[int]) -> None:
        pass

    def factory(
        self, settings: Settings, package: ModelPackage
    ) -> tuple[FakeEngine, Precision, list[str]]:
        return self, Precision.FP32, []

    @property
    def images_seen(self) -> int:
        return sum(len(batch) for batch in self.batches)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value from Prometheus text exposition (0 when absent)."""
    wanted = labels or {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        sample_name, _, label_text = metric.partition("{")
        if sample_name != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        found = {key: val.strip('"') for key, val in found.items()}
        if all(found.get(key) == val for key, val in wanted.items()):
            return float(value)
    return 0.0


def png(
    size: tuple[int, int] = (32, 32),
    color: tuple[int, int, int] = (200, 30, 30),
    noise: bool = False,
    seed: int = 0,
) -> bytes:
    """A small RGB PNG request body: one colour, or random pixels (which compress poorly,
    so the body is about width x height x 3 bytes)."""
    if noise:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims `width` x `height` (CRC fixed up): a
    decompression bomb's header, and nothing behind it."""
    data = bytearray(png((1, 1)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


@functools.cache
def cuda_usable() -> bool:
    """Whether this ONNX Runtime build has CUDA and a session actually gets it (not only the
    build: onnxruntime-gpu on a host without a GPU falls back to the CPU)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    return session.get_providers()[0] == "CUDAExecutionProvider"
