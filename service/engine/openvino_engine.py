"""OpenVINO inference on the CPU: the package's own ONNX graphs, read by OpenVINO (no
conversion step, nothing new in the package), behind the same `run` / `warm_up` as the
ONNX Runtime engine.

The thread plan maps onto OpenVINO's streams: `instances` streams of `threads` threads
each run batches side by side (one compiled model, its weights shared), and with several
instances a second compiled model of one stream with `solo_threads` threads takes a
batch that runs alone. Every property that decides speed or numbers is set explicitly
rather than left to OpenVINO's hints:
- `INFERENCE_PRECISION_HINT` f32: on CPUs it deems able, OpenVINO computes in BF16 by
  default (it does on the AMD EPYC the benchmarks ran on), which the export's FP32
  verification never saw. INT8 graphs keep their quantised ops in int8 and the rest f32.
- `ENABLE_CPU_PINNING` off: OpenVINO pins its threads to the first cores of the affinity
  mask, and a pod limited by a CFS quota sees every core of its node, so every pod on the
  node would pin to the same few cores.
- `CACHE_DIR`: compiled models are kept (keyed by OpenVINO on the graph and the
  properties), so a restart imports instead of compiling.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

log = logging.getLogger("resnet_serve.engine")

RUNTIME = "openvino"
DEVICE = "CPU"  # OpenVINO's device name; the only one this engine uses
LOGITS, EMBEDDING = "logits", "embedding"


@dataclass(frozen=True)
class OpenVinoOptions:
    instances: int = 1  # streams that run batches side by side
    threads: int = 1  # of each stream
    solo_threads: int = 0  # with several instances: the compiled model for a lone batch
    cache_dir: Path | None = None  # None: compile at every start


def compile_properties(streams: int, threads_per_stream: int) -> dict[str, Any]:
    """The CPU plugin's properties for `streams` streams of `threads_per_stream` threads."""
    return {
        "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": streams * threads_per_stream,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }


def usable_cache_dir(directory: Path | None) -> Path | None:
    """`directory`, created if need be, or None (with a warning) where it cannot be
    written: a read-only filesystem costs a compile at each start, never the start."""
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("OpenVINO model cache off: cannot create %s (%s)", directory, exc)
        return None
    if not os.access(directory, os.W_OK | os.X_OK):
        log.warning("OpenVINO model cache off: %s is not writable", directory)
        return None
    return directory


class OpenVinoEngine:
    """OpenVINO over a graph with a uint8 image input and two outputs, on the CPU.

    `run` may be called from several threads at once: each call takes an infer request
    of its own (an infer request runs one batch at a time), made on demand when more
    callers than instances arrive; OpenVINO queues their batches onto its streams.
    """

    runtime = RUNTIME

    def __init__(self, model_path: Path, options: OpenVinoOptions) -> None:
        core = ov.Core()
        self._core = core  # outlives the compiled models made from it
        cache = usable_cache_dir(options.cache_dir)
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        self.cache_dir = cache
        self.runtime_version = ov.get_version().split("-")[0]
        self.providers: list[str] = [DEVICE]
        self.providers_requested: list[str] = [DEVICE]
        self.device = "cpu"
        self.model_path = model_path
        count = max(1, options.instances)
        threads = max(1, options.threads)
        self._compiled = core.compile_model(
            str(model_path), DEVICE, compile_properties(count, threads)
        )
        self._check_graph(model_path)
        self._solo: ov.CompiledModel | None = None
        if count > 1 and options.solo_threads > threads:
            self._solo = core.compile_model(
                str(model_path), DEVICE, compile_properties(1, options.solo_threads)
            )
        self._requests = [self._compiled.create_infer_request() for _ in range(count)]
        self._free = list(reversed(self._requests))  # a stack: the first is reused first
        self._solo_request = self._solo.create_infer_request() if self._solo else None
        self._lock = threading.Lock()

    def _check_graph(self, model_path: Path) -> None:
        inputs = self._compiled.inputs
        shape = inputs[0].get_partial_shape() if len(inputs) == 1 else None
        if shape is None or inputs[0].get_element_type() != ov.Type.u8 or shape.rank != 4:
            raise ValueError(f"{model_path} must take one uint8 [N, H, W, 3] input")
        self.input_shape = tuple(int(dim.get_length()) for dim in list(shape)[1:])
        outputs = {name: port for port in self._compiled.outputs for name in port.get_names()}
        if LOGITS not in outputs or EMBEDDING not in outputs:
            raise ValueError(f"{model_path} must have outputs {LOGITS!r} and {EMBEDDING!r}")
        self._logits, self._embedding = outputs[LOGITS], outputs[EMBEDDING]
        self.num_classes = int(self._logits.get_partial_shape()[1].get_length())
        self.embedding_dim = int(self._embedding.get_partial_shape()[1].get_length())

    @property
    def sessions(self) -> int:
        """Compiled models (the instances' one with its streams, and the solo one)."""
        return 1 + (self._solo is not None)

    @property
    def has_solo_session(self) -> bool:
        return self._solo is not None

    def property(self, name: str, solo: bool = False) -> Any:
        """A property the CPU plugin compiled with (what it took of what was asked)."""
        compiled = self._solo if solo and self._solo is not None else self._compiled
        return compiled.get_property(name)

    def run(self, batch: np.ndarray, alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`batch` is uint8 [N, H, W, 3]; returns float32 logits [N, C] and embeddings [N, D].

        `alone`: nothing else runs on this engine until this returns (the caller's
        promise), so the batch may take the solo compiled model's threads."""
        if alone and self._solo_request is not None:
            return self._run_on(self._solo_request, batch)
        request = self._acquire()
        try:
            return self._run_on(request, batch)
        finally:
            with self._lock:
                self._free.append(request)

    def _acquire(self) -> ov.InferRequest:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._compiled.create_infer_request()  # kept in the pool once released

    def _run_on(self, request: ov.InferRequest, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outputs are copied out: the request's own tensors are rewritten by its next
        run."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        request.infer({0: batch}, share_inputs=True)
        logits = np.array(request.get_tensor(self._logits).data, dtype=np.float32)
        embedding = np.array(request.get_tensor(self._embedding).data, dtype=np.float32)
        return logits, embedding

    def warm_up(self, batch_sizes: Sequence[int]) -> float:
        """Run each batch size once on every stream (the instances' requests at once, so
        each stream takes one) and on the solo model; returns the milliseconds a lone image
        then takes on an instance (the median of three runs), as the ONNX Runtime engine."""
        for size in batch_sizes:
            zeros = np.zeros((size, *self.input_shape), dtype=np.uint8)
            for request in self._requests:
                request.start_async({0: zeros})
            for request in self._requests:
                request.wait()
            if self._solo_request is not None:
                self._run_on(self._solo_request, zeros)
        one = np.zeros((1, *self.input_shape), dtype=np.uint8)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            self._run_on(self._requests[0], one)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000
