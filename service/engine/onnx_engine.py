"""ONNX Runtime inference: a batch of uint8 pixels in, logits and embeddings out.

Knows nothing of HTTP, images or queues. `run` is synchronous and thread-safe (ONNX
Runtime releases the GIL while it computes); callers run it on a dedicated executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model_package import ModelPackage, Precision

log = logging.getLogger("resnet_serve.engine")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider"})
LOGITS, EMBEDDING = "logits", "embedding"


@dataclass(frozen=True)
class EngineOptions:
    providers: Sequence[str] = ("auto",)
    device_id: int = 0
    instances: int = 1  # sessions that run batches side by side (see InferenceEngine)
    intra_op_threads: int = 0  # of each instance; 0: ONNX Runtime's default (physical cores)
    solo_threads: int = 0  # CPUs only, with several instances: the session for a lone batch
    inter_op_threads: int = 1
    allow_spinning: bool = False


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """`auto` → CUDA when this ONNX Runtime build has it, then CPU; unknown names fail."""
    available = ort.get_available_providers()
    if list(requested) == ["auto"]:
        return [CUDA, CPU] if CUDA in available else [CPU]
    missing = [name for name in requested if name not in available]
    if missing:
        raise ValueError(
            f"execution providers {missing} are not in this ONNX Runtime build "
            f"(available: {', '.join(available)})"
        )
    return list(requested)


def choose_variant(
    package: ModelPackage, requested: Precision, providers: Sequence[str]
) -> tuple[Precision, Path, list[str]]:
    """The variant to load, with a warning for each fallback from what was asked."""
    warnings: list[str] = []
    precision = requested
    if precision is Precision.FP16 and not GPU_PROVIDERS.intersection(providers):
        warnings.append(
            "fp16 was requested but no GPU execution provider is in use; FP16 on CPU is "
            "slower than FP32, so serving fp32"
        )
        precision = Precision.FP32
    path = package.variant_path(precision)
    if path is None:
        warnings.append(
            f"the package at {package.directory} has no {precision} variant "
            f"(it has: {', '.join(package.manifest.variants)}); serving fp32. "
            f"Export one with `resnet-export ... --precision {precision}`"
        )
        precision = Precision.FP32
        path = package.variant_path(precision)
    if path is None:
        raise FileNotFoundError(f"the package at {package.directory} has no fp32 variant")
    return precision, path, warnings


def cuda_options(device_id: int) -> dict[str, str]:
    """The CUDA provider's options: only the device. Its documented defaults are the ones
    we want (docs/operations.md, "GPU"): `cudnn_conv_algo_search` EXHAUSTIVE, searched
    once per input shape, i.e. once per batch size during warm-up;
    `do_copy_in_default_stream` 1, copies on the compute stream (0 risks data races)."""
    return {"device_id": str(device_id)}


class InferenceEngine:
    """ONNX Runtime over a graph with a uint8 image input and two outputs.

    `instances` sessions run batches side by side, each with `intra_op_threads` threads,
    as Triton's instance groups do: a batch waits on its own threads' barriers only, never
    on another batch's. On CPUs with several instances there is one more session, with
    `solo_threads` (every CPU), for a batch that runs *alone* (`run(batch, alone=True)`:
    the caller promises that nothing else runs until it returns), so a lone request gets
    the latency of the whole machine. Other batches take a free instance. `run` may be
    called from up to `instances` threads at once (more share sessions, which ONNX Runtime
    allows).
    """

    runtime = "onnxruntime"
    runtime_version: str = ort.__version__

    def __init__(self, model_path: Path, options: EngineOptions) -> None:
        providers = resolve_providers(options.providers)
        self.providers_requested = providers  # `self.providers`: what the session got
        provider_options = [
            cuda_options(options.device_id) if name == CUDA else {} for name in providers
        ]

        def open_session(intra_op_threads: int) -> ort.InferenceSession:
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session_options.intra_op_num_threads = intra_op_threads
            session_options.inter_op_num_threads = options.inter_op_threads
            session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            session_options.add_session_config_entry(
                "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
            )
            return ort.InferenceSession(
                str(model_path),
                session_options,
                providers=providers,
                provider_options=provider_options,
            )

        first = open_session(options.intra_op_threads)
        inputs = first.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise ValueError(f"{model_path} must take one uint8 [N, H, W, 3] input")
        self.input_name: str = inputs[0].name
        height, width, channels = inputs[0].shape[1:]
        self.input_shape = (int(height), int(width), int(channels))
        outputs = {output.name: output for output in first.get_outputs()}
        if set(outputs) != {LOGITS, EMBEDDING}:
            raise ValueError(f"{model_path} must have outputs {LOGITS!r} and {EMBEDDING!r}")
        self.num_classes = int(outputs[LOGITS].shape[1])
        self.embedding_dim = int(outputs[EMBEDDING].shape[1])
        self.providers: list[str] = first.get_providers()
        self.device = "cuda" if CUDA in self.providers else "cpu"
        self.model_path = model_path
        count = max(1, options.instances)
        self._instances = [
            first,
            *(open_session(options.intra_op_threads) for _ in range(count - 1)),
        ]
        self._free = list(reversed(self._instances))  # a stack: the first instance is reused first
        self._solo: ort.InferenceSession | None = None
        if self.device == "cpu" and count > 1 and options.solo_threads > options.intra_op_threads:
            self._solo = open_session(options.solo_threads)
        self._lock = threading.Lock()

    @property
    def sessions(self) -> int:
        return len(self._instances) + (self._solo is not None)

    @property
    def has_solo_session(self) -> bool:
        """Whether a batch that runs alone gets more threads than one on an instance."""
        return self._solo is not None

    def run(self, batch: np.ndarray, alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`batch` is uint8 [N, H, W, 3]; returns float32 logits [N, C] and embeddings [N, D].

        `alone`: nothing else runs on this engine until this returns, so the batch may
        take every CPU (the solo session); a batch beside it there would fight its threads.
        """
        if alone and self._solo is not None:
            return self._run_on(self._solo, batch)
        session, instance = self._acquire()
        try:
            return self._run_on(session, batch)
        finally:
            self._release(session, instance)

    def _acquire(self) -> tuple[ort.InferenceSession, bool]:
        """A free instance for the next batch, and whether it must be given back."""
        with self._lock:
            if self._free:
                return self._free.pop(), True
        return self._instances[0], False  # more callers than instances: share the first

    def _release(self, session: ort.InferenceSession, instance: bool) -> None:
        if instance:
            with self._lock:
                self._free.append(session)

    def _run_on(
        self, session: ort.InferenceSession, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """I/O binding hands ONNX Runtime our own output arrays to fill: on CUDA the results
        are copied from the GPU once, straight into them, and never copied again."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        count = batch.shape[0]
        logits = np.empty((count, self.num_classes), dtype=np.float32)
        embedding = np.empty((count, self.embedding_dim), dtype=np.float32)
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        binding.bind_output(EMBEDDING, "cpu", 0, np.float32, embedding.shape, embedding.ctypes.data)
        session.run_with_iobinding(binding)
        return logits, embedding

    def warm_up(self, batch_sizes: Sequence[int]) -> float:
        """Run each batch size once, so first requests don't pay for allocation and
        (on CUDA) convolution algorithm search. Returns the milliseconds a lone image
        then takes on an instance (the median of three runs), which tells a model that
        costs microseconds from one that dominates a request."""
        sessions = [*self._instances, *([self._solo] if self._solo is not None else [])]
        for session in sessions:
            for size in batch_sizes:
                self._run_on(session, np.zeros((size, *self.input_shape), dtype=np.uint8))
        one = np.zeros((1, *self.input_shape), dtype=np.uint8)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            self._run_on(self._instances[0], one)
            times.append(time.perf_counter() - started)
        return sorted(times)[1] * 1000
