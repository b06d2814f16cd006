"""What differs between serving on CPUs and on GPUs, decided once when the engine is known.

- Concurrent batches: on CPUs one per engine instance, each on its own cores; on GPUs two,
  so the next batch is copied to the device while the current one computes.
- Batches that run alone (CPUs with several instances; the batcher's `run_alone`): a batch
  that starts while nothing runs, with no more queued than one busy batch, runs on every
  CPU and nothing starts beside it (a batch beside it took cores its threads spin on: on 2
  CPUs the two together served 47 img/s against 59-63 for either way alone). A longer queue
  goes to the instances, side by side.
- The busy batch size (the most images a batch on an instance takes): on CPUs, one image
  on one-thread instances, which have no barrier to amortise (per-core speed was the same
  at batches of 1 to 8 on 2 CPUs, and one image at a time halved the open-loop tail at 80%
  and 95% load against two); `CPU_BUSY_IMAGES_PER_THREAD` on instances of several threads
  (on 16 CPUs, four-thread instances with batches of 2 starved). docs/benchmarks.md has
  the figures. Unless the model is cheap: warm-up times a lone image, and below
  `CHEAP_ENGINE_MS` busy batches take up to max_batch_size (`with_measured_engine`).
- Decoding: on CPUs as the first step of each batch (decoding and inference share the cores,
  and overlapping them only makes each slower); on GPUs before queueing, while the GPU runs.
- Warm-up: every batch size on GPUs (each shape gets its own kernel search), powers of two
  on CPUs.
"""

from __future__ import annotations

from dataclasses import replace

from service.config import Settings
from service.cpus import ThreadPlan
from service.engine_api import DevicePolicy

GPU_CONCURRENT_BATCHES = 2
# On CPUs a batch on an instance of several threads takes up to 2 images per thread.
CPU_BUSY_IMAGES_PER_THREAD = 2
# A model whose lone image runs faster than this is cheap beside decoding and batching.
CHEAP_ENGINE_MS = 1.0


def device_policy(settings: Settings, plan: ThreadPlan, device: str) -> DevicePolicy:
    on_cpu = device == "cpu"
    default_concurrency = plan.instances if on_cpu else GPU_CONCURRENT_BATCHES
    concurrency = settings.max_concurrent_batches or default_concurrency
    overlap = settings.overlap_decode
    return DevicePolicy(
        device=device,
        concurrent_batches=concurrency,
        partial_batches_while_busy=settings.partial_batches_while_busy,
        busy_batch_size=settings.busy_batch_size or busy_batch_size(settings, plan, on_cpu),
        decode_in_batch=not (overlap if overlap is not None else not on_cpu),
        warmup_sizes=settings.warmup_batch_sizes or warmup_sizes(settings.max_batch_size, on_cpu),
    )


def with_measured_engine(
    policy: DevicePolicy, settings: Settings, ms_per_image: float | None
) -> DevicePolicy:
    """The policy once warm-up has timed a lone image. On CPUs a model that costs less
    than `CHEAP_ENGINE_MS` an image is dwarfed by what a batch costs besides it (the
    batcher, the hand-off to a thread, the run call: about 0.5 ms on 2 CPUs), so busy
    batches take up to `max_batch_size` images instead of one (cheap-engine package on 2
    CPUs: 706 against 562 img/s, 2.63 against 3.07 CPU-ms an image; docs/benchmarks.md),
    no batch runs alone, and the front-ends decode (unless `--overlap-decode` says)."""
    if ms_per_image is None:
        return policy
    policy = replace(policy, engine_ms_per_image=round(ms_per_image, 3))
    if policy.device != "cpu" or ms_per_image >= CHEAP_ENGINE_MS:
        return policy
    # Nor does a lone batch gain from running alone on every CPU; and decoding, now the
    # bulk of the work, goes to the front-ends, several processes with no GIL between them
    # (cheap-engine package, 2 CPUs, 2 front-ends: 482 against 390 req/s).
    return replace(
        policy,
        busy_batch_size=settings.busy_batch_size or settings.max_batch_size,
        lone_batches_alone=False,
        decode_in_batch=policy.decode_in_batch if settings.overlap_decode is not None else False,
    )


def busy_batch_size(settings: Settings, plan: ThreadPlan, on_cpu: bool) -> int:
    if not on_cpu:
        return settings.max_batch_size
    if plan.intra_op_threads == 1:
        return 1  # no barrier to amortise: one image at a time runs at full speed per core
    return min(settings.max_batch_size, CPU_BUSY_IMAGES_PER_THREAD * plan.intra_op_threads)


def warmup_sizes(max_batch_size: int, on_cpu: bool) -> list[int]:
    if not on_cpu:
        return list(range(1, max_batch_size + 1))
    sizes = {1 << power for power in range(max_batch_size.bit_length())}
    return sorted({size for size in sizes if size <= max_batch_size} | {max_batch_size})
