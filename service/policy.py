"""What differs between serving on CPUs and on GPUs, decided once when the engine is known.

- Concurrent batches: on CPUs one per engine instance, each on its own cores; on GPUs two,
  so the next batch is copied to the device while the current one computes.
- Partial batches beside a running one: on GPUs, after `max_queue_delay`. On CPUs only a
  full batch starts beside a running one: the first batch of a quiet spell runs alone on
  every core (the lowest latency), and a second one would take cores from it; once a full
  batch waits, there is a backlog, and batches on instances of their own serve more per
  core (no waiting on each other's thread barriers). Such a batch is full, and starts, at
  `CPU_BUSY_IMAGES_PER_THREAD` images per thread of its instance: on 2 CPUs (instances of
  one thread) a batch of 8 beside a running one held its requests for several times as
  long as on all the cores, which measured as the open-loop tail; on 16 CPUs (instances of
  four threads) batches of 2 left the instances starving (docs/benchmarks.md).
- Decoding: on CPUs as the first step of each batch (decoding and inference share the cores,
  and overlapping them only makes each slower); on GPUs before queueing, while the GPU runs.
- Warm-up: every batch size on GPUs (each shape gets its own kernel search), powers of two
  on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.cpus import ThreadPlan

GPU_CONCURRENT_BATCHES = 2
# On CPUs a batch that starts beside a running one runs on an instance with a share of the
# cores: 2 images per thread take it about as long as a lone batch of 4 on 2 threads.
CPU_BUSY_IMAGES_PER_THREAD = 2


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    concurrent_batches: int
    partial_batches_while_busy: bool
    busy_batch_size: int  # the most images a batch that starts beside a running one takes
    decode_in_batch: bool
    warmup_sizes: list[int]


def device_policy(settings: Settings, plan: ThreadPlan, device: str) -> DevicePolicy:
    on_cpu = device == "cpu"
    default_concurrency = plan.instances if on_cpu else GPU_CONCURRENT_BATCHES
    concurrency = settings.max_concurrent_batches or default_concurrency
    overlap = settings.overlap_decode
    return DevicePolicy(
        device=device,
        concurrent_batches=concurrency,
        partial_batches_while_busy=(
            not on_cpu
            if settings.partial_batches_while_busy is None
            else settings.partial_batches_while_busy
        ),
        busy_batch_size=settings.busy_batch_size or busy_batch_size(settings, plan, on_cpu),
        decode_in_batch=not (overlap if overlap is not None else not on_cpu),
        warmup_sizes=settings.warmup_batch_sizes or warmup_sizes(settings.max_batch_size, on_cpu),
    )


def busy_batch_size(settings: Settings, plan: ThreadPlan, on_cpu: bool) -> int:
    if not on_cpu:
        return settings.max_batch_size
    return min(settings.max_batch_size, CPU_BUSY_IMAGES_PER_THREAD * plan.intra_op_threads)


def warmup_sizes(max_batch_size: int, on_cpu: bool) -> list[int]:
    if not on_cpu:
        return list(range(1, max_batch_size + 1))
    sizes = {1 << power for power in range(max_batch_size.bit_length())}
    return sorted({size for size in sizes if size <= max_batch_size} | {max_batch_size})
