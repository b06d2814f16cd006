"""What differs between serving on CPUs and on GPUs, decided once when the engine is known.

- Concurrent batches: on CPUs one per engine instance, each on its own cores; on GPUs two,
  so the next batch is copied to the device while the current one computes.
- Partial batches beside a running one: on GPUs, after `max_queue_delay`. On CPUs only a
  full batch starts beside a running one: the first batch of a quiet spell runs alone on
  every core (the lowest latency), and a second one would take cores from it; once a full
  batch waits, there is a backlog, and batches on instances of their own serve more per
  core (no waiting on each other's thread barriers).
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


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    concurrent_batches: int
    partial_batches_while_busy: bool
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
        partial_batches_while_busy=not on_cpu,
        decode_in_batch=not (overlap if overlap is not None else not on_cpu),
        warmup_sizes=settings.warmup_batch_sizes or warmup_sizes(settings.max_batch_size, on_cpu),
    )


def warmup_sizes(max_batch_size: int, on_cpu: bool) -> list[int]:
    if not on_cpu:
        return list(range(1, max_batch_size + 1))
    sizes = {1 << power for power in range(max_batch_size.bit_length())}
    return sorted({size for size in sizes if size <= max_batch_size} | {max_batch_size})
