"""Service settings: one pydantic-settings object, read from `RESNET_SERVE_*` environment
variables and overridden by command-line flags, passed into `create_app(settings)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.cpus import ThreadPlan, cpu_limit, plan_threads
from service.model_package import Precision

ENV_PREFIX = "RESNET_SERVE_"
# The inference runtimes (service/engine/runtimes.py tells whether each is installed).
Runtime = Literal["onnxruntime", "openvino"]
AUTO_PROVIDERS = "auto"
# Settings read from the environment only, never from a flag: a command line is visible to
# every user of the host (ps, /proc/*/cmdline) and is printed by --help.
ENV_ONLY = frozenset({"api_keys"})


class Settings(BaseSettings):
    """Every field is also an environment variable: `model_dir` is `RESNET_SERVE_MODEL_DIR`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- model
    model_dir: Path = Field(Path("models/resnet50"), description="model package directory")
    precision: Precision = Field(
        Precision.FP32,
        description="variant of the package to serve; falls back to fp32 with a warning "
        "when the package lacks it (and fp16 falls back on CPU-only hosts)",
    )
    runtime: Runtime = Field(
        "onnxruntime",
        description="the inference runtime: onnxruntime (from the cpu or gpu extra; CUDA "
        "when available) or openvino (the openvino extra; CPUs only), which reads the same "
        "ONNX graphs. docs/operations.md says when to choose which",
    )
    openvino_cache_dir: Path | None = Field(
        None,
        description="with --runtime openvino: where compiled models are kept, so a restart "
        "skips compiling (default: resnet-serve-openvino in the temp directory, $TMPDIR or "
        "/tmp; where it cannot be written, every start compiles)",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [AUTO_PROVIDERS],
        description="ONNX Runtime execution providers in order of preference, comma "
        "separated; 'auto' = CUDAExecutionProvider when available, then CPUExecutionProvider",
    )
    device_id: int = Field(0, ge=0, description="GPU index for the CUDA provider")
    engine_instances: int = Field(
        0,
        ge=0,
        le=64,
        description="engine instances (ONNX Runtime sessions; OpenVINO streams) that run "
        "batches side by side "
        "(0: on CPUs one per 4 CPUs this process may use, at least one; on GPUs one). With "
        "several, a batch that runs alone gets an extra session with every CPU",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime (or OpenVINO) threads of each engine instance (0: the CPUs "
        "this process "
        "may use, the smallest of its cgroup CPU quota and its affinity mask, shared evenly "
        "among the instances)",
    )
    inter_op_threads: int = Field(
        1, ge=1, description="ONNX Runtime inter-op threads (not OpenVINO)"
    )
    allow_spinning: bool | None = Field(
        None,
        description="let ONNX Runtime threads spin briefly between ops instead of sleeping "
        "(a thread that slept must be woken, which cost a lone request ~10% latency on 2 "
        "cores); default: on, unless the threads would exceed the cgroup's CPU quota, where "
        "spinning only gets the pod throttled",
    )

    # --- batching
    max_batch_size: int = Field(8, ge=1, le=1024, description="images per engine run, at most")
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        description="how long a partial batch may wait for more images: right after a "
        "batch (for the queue to refill to that batch's size) or while another batch runs. "
        "0: a free engine takes whatever is queued at once, which won under open-loop "
        "(Poisson) load; a few ms can pay when clients resend in lockstep",
    )
    max_queue_size: int = Field(
        256, ge=1, description="images admitted and not yet running; beyond it: 429"
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        le=64,
        description="batches running on the engine at once (default: the number of engine "
        "instances on CPUs, 2 on GPUs). CPUs: one batch per engine instance, except that a "
        "batch that starts while nothing runs, with no more queued than one busy batch, "
        "runs alone on every CPU and nothing starts beside it. GPUs: concurrent runs on "
        "one session, each on its own CUDA stream, so the next batch is queued while the "
        "last one's results are copied back",
    )
    partial_batches_while_busy: bool = Field(
        True,
        description="let a partial batch start beside a running one once its oldest image "
        "has waited --max-queue-delay-ms (default: on; off: only a full batch starts beside "
        "a running one)",
    )
    busy_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="images in a batch that shares the engine, at most: one that starts "
        "beside a running batch, and on CPUs any batch but one that runs alone (it is full, "
        "and starts, at that size); default: on CPUs, where it runs on an engine instance "
        "with a share of the cores, 1 on one-thread instances and 2 per thread on larger "
        "ones; max_batch_size on GPUs, and on CPUs when warm-up finds a lone image runs "
        "in under 1 ms (a model that cheap gains nothing from small batches)",
    )
    request_timeout_ms: float = Field(
        30_000, gt=0, description="per-request deadline from arrival; beyond it: 504"
    )
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="batch sizes run once before readiness, comma separated (default: every "
        "size up to max_batch_size on GPUs, powers of two and the maximum on CPUs)",
    )

    # --- requests
    overlap_decode: bool | None = Field(
        None,
        description="decode images while the engine runs other batches (right for GPUs), "
        "rather than as the first step of each batch (right on CPUs, where decoding and "
        "inference share the cores and overlapping them only makes each slower); "
        "default: overlap on GPUs, and on CPUs when warm-up finds a lone image runs in "
        "under 1 ms (the front-ends decode, and no batch runs alone on every CPU)",
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        description="image decoding threads (default: one per CPU this process may use, at most 8)",
    )
    max_images_per_request: int = Field(32, ge=1, description="images in one request, at most")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body limit")
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="request-body bytes held by all requests in progress together (from the "
        "first byte read to the response); a request that would exceed it gets 429 before "
        "its body is read",
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="width x height limit per image, checked before decoding"
    )
    max_request_pixels: int = Field(
        400_000_000,
        ge=1,
        description="pixels of all the images of one request together, checked from their "
        "headers before decoding; beyond it: 413",
    )
    max_decoding_pixels: int = Field(
        100_000_000,
        ge=1,
        description="pixels being decoded at once across all decode threads; further "
        "decodes wait their turn (bounds decoding memory at roughly 6 bytes a pixel)",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="time to receive a request body; beyond it: 408"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="time for a client to send a request's headers once it has connected "
        "or begun a request; a connection that takes longer is closed (slowloris)",
    )
    default_top_k: int = Field(5, ge=1, description="top_k when the request gives none")

    # --- access
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys, comma separated: environment only, never a flag",
    )
    api_keys_file: Path | None = Field(
        None,
        description="a file of accepted API keys, one per line (a mounted Secret); re-read "
        "when it changes, so a rotated key takes effect without a restart. With neither "
        "this nor RESNET_SERVE_API_KEYS, no key is needed",
    )
    api_key_for_probes: bool = Field(
        False, description="require the API key on /healthz and /readyz too"
    )
    api_key_for_metrics: bool = Field(False, description="require the API key on /metrics too")

    # --- processes
    workers: int | None = Field(
        None,
        ge=0,
        le=32,
        description="front-end processes (HTTP, gRPC, decoding) beside the one engine "
        "process that owns the model and the batcher; all listen on the same port "
        "(SO_REUSEPORT). 0: everything in one process. Default: one process where the "
        "engine runs on the CPU and, timed at start, does at most 100 img/s (a CPU model on "
        "a small pod); otherwise one per CPU this process may use, at most 8",
    )

    # --- server
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="serve the Open Inference Protocol (KServe v2) over gRPC on this port, "
        "beside HTTP in the same process (0: off)",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, how long to finish accepted requests: one deadline for the "
        "whole shutdown (set terminationGracePeriodSeconds to this + the preStop sleep + 5)",
    )
    keepalive_timeout_s: int = Field(
        75,
        ge=1,
        description="close idle keep-alive connections after this long; keep it above the "
        "idle timeout of any load balancer in front, so the server never closes first",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="the event loop. asyncio lets go of the GIL in every socket call; "
        "uvloop keeps it, and a response write that wakes the client keeps it for as long "
        "as the kernel takes, while the engine threads wait for it (asyncio served 2-3% "
        "more on 2 CPUs)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one JSON object a line, with the request id on every line logged "
        "while serving a request",
    )
    access_log: bool = Field(False, description="log every request (costs throughput)")

    # --- observability
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve /metrics on this port (same host) instead of the main one, so it "
        "can stay off the Ingress; not the main or the gRPC port; default: on the main port",
    )

    def thread_plan(self, gpu: bool = False) -> ThreadPlan:
        """The thread counts to use: these settings, with the automatic ones sized from
        the CPUs this process may use (service/cpus.py); one engine instance on a GPU
        unless set."""
        return plan_threads(
            cpu_limit(),
            self.intra_op_threads,
            self.decode_workers,
            self.allow_spinning,
            self.engine_instances or (1 if gpu else 0),
        )

    @field_validator("providers", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup_batch_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(part) for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.providers:
            raise ValueError("providers must name at least one execution provider or 'auto'")
        if self.runtime == "openvino" and self.providers != [AUTO_PROVIDERS]:
            raise ValueError(
                "providers are ONNX Runtime's execution providers: with runtime openvino "
                "leave them at 'auto' (OpenVINO runs on the CPU)"
            )
        too_big = [size for size in self.warmup_batch_sizes if not 1 <= size <= self.max_batch_size]
        if too_big:
            raise ValueError(
                f"warmup_batch_sizes {too_big} must lie between 1 and max_batch_size "
                f"({self.max_batch_size})"
            )
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes})"
            )
        self._check_ports_differ()
        return self

    def _check_ports_differ(self) -> None:
        """Each listener on a port of its own: two on one port would fail to bind, or (with
        SO_REUSEPORT) share it and answer each other's clients. 0 is never a clash: a free
        port for `port` and `metrics_port`, off for `grpc_port`."""
        taken: dict[int, str] = {}
        for name in ("port", "grpc_port", "metrics_port"):
            number = getattr(self, name)
            if not number:
                continue
            if number in taken:
                raise ValueError(
                    f"{name} ({number}) is the same port as {taken[number]}: each listener "
                    "needs a port of its own"
                )
            taken[number] = name
