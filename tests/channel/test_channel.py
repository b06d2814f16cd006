"""The channel between front-ends and the engine, on its own: the wire format, the arena,
the server-wide admission counts across real processes, and both ends of a connection in
one event loop (the engine side over a real `EngineCore` and a test double of the model)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loadtests.cheap_package import write_cheap_package
from service.channel import wire
from service.channel.admission import AdmissionCounts
from service.channel.arena import Arena, ShmUnavailable, check_room
from service.channel.client import RemoteEngine
from service.channel.server import EngineServer
from service.config import Settings
from service.engine.core import EngineCore
from service.engine.process import SharedDepth
from service.engine_api import (
    ALL_OUTPUTS,
    EMBEDDING,
    LOGITS,
    DevicePolicy,
    EngineInfo,
    EngineState,
    Served,
)
from service.errors import EngineUnavailable, InvalidImage, QueueFull
from service.model_package import Precision
from service.observability.aggregate import render
from service.observability.metrics import ServiceMetrics
from service.processes import spawn_context
from tests.support import FakeEngine, metric_value

CROP = 224


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cheap_package(tmp_path_factory.mktemp("cheap") / "package")


# ---------------------------------------------------------------- wire


def test_every_message_survives_the_wire() -> None:
    info = EngineInfo(
        Served(Precision.INT8, ["CPUExecutionProvider"], "cpu", ["a warning"]),
        DevicePolicy("cpu", 2, True, 1, True, [1, 2, 4]),
        {"cpus": 2.0, "engine_instances": 2},
    )
    messages: list[wire.ToEngine | wire.ToFrontend] = [
        wire.Hello(3, 1234, 4096),
        wire.Submit(7, 123.5, wire.WANT_LOGITS, [wire.Item(wire.ENCODED, 64, 100, 256)]),
        wire.Cancel(7),
        wire.Ping(1),
        wire.Collect(2),
        wire.Samples(2, [["resnet_images", "counter", "doc", "", [["x", {"a": "b"}, 1.0, None]]]]),
        wire.EngineStatus("ready", info, 2),
        wire.Result(7, [wire.ItemResult(), wire.ItemResult(status=400, code="invalid_image")]),
        wire.Pong(1),
        wire.Metrics(2, []),
    ]
    for message in messages:
        framed = wire.frame(message)
        assert wire.HEADER.unpack(framed[:4])[0] == len(framed) - 4
        body = framed[4:]
        decoded = (
            wire.decode_for_engine(body)
            if isinstance(message, wire.ToEngine.__args__)  # type: ignore[attr-defined]
            else wire.decode_for_frontend(body)
        )
        assert decoded == message
    status = wire.decode_for_frontend(wire.frame(wire.EngineStatus("ready", info))[4:])
    assert isinstance(status, wire.EngineStatus)
    assert status.info == info
    assert status.info.served.precision is Precision.INT8


def test_a_frame_that_is_not_a_message_is_a_protocol_error() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.decode_for_engine(b"\x93\x01\x02\x03")
    with pytest.raises(wire.ProtocolError):  # a message for the other direction
        wire.decode_for_engine(wire.frame(wire.Pong(1))[4:])


# ---------------------------------------------------------------- arena


def test_the_arena_allocates_first_fit_and_merges_what_is_freed() -> None:
    arena = Arena(64 * 100)
    blocks = [arena.allocate(64 * 10) for _ in range(10)]
    assert blocks == [64 * 10 * i for i in range(10)]
    assert arena.allocate(1) is None  # full
    arena.release(blocks[3])
    arena.release(blocks[4])
    assert arena.allocate(64 * 20) == blocks[3]  # the two freed neighbours, merged
    for block in (blocks[0], blocks[1], blocks[2], blocks[3], *blocks[5:]):
        arena.release(block)
    assert arena.bytes_in_use == 0
    assert arena.allocate(64 * 100) == 0  # everything merged back into one block
    arena.close()


def test_the_arena_has_no_name_in_dev_shm() -> None:
    before = set(os.listdir("/dev/shm"))
    arena = Arena(1 << 20)
    arena.write(0, b"pixels")
    assert set(os.listdir("/dev/shm")) == before
    assert os.readlink(f"/proc/self/fd/{arena.fd}").endswith("(deleted)")
    arena.close()


def test_too_little_shared_memory_is_refused_in_one_line() -> None:
    with pytest.raises(ShmUnavailable) as refused:
        check_room(1 << 60)
    assert "\n" not in str(refused.value)
    assert "emptyDir" in str(refused.value)
    with pytest.raises(ShmUnavailable):
        check_room(1, Path(tempfile.gettempdir()) / "no-such-directory")


# ---------------------------------------------------------------- admission


def _hammer(counts: AdmissionCounts, slot: int, rounds: int, results: object) -> None:
    over = admitted = 0
    for _ in range(rounds):
        try:
            counts.reserve(slot, 1)
        except QueueFull:
            continue
        admitted += 1
        if counts.depth > counts.capacity:
            over += 1
        counts.release(slot, 1)
    results.put((admitted, over))  # type: ignore[attr-defined]


def test_admission_is_one_count_across_processes() -> None:
    counts = AdmissionCounts.create(capacity=10)
    counts.reserve(0, 6)
    with pytest.raises(QueueFull) as full:
        counts.reserve(1, 5)
    assert "holds 6 of 10" in full.value.message
    assert full.value.headers["Retry-After"] == "1"
    counts.reserve(1, 4)
    counts.received(0, 6)  # the engine has them now: the total is unchanged
    assert counts.depth == 10
    counts.set_engine_depth(2)  # four started
    counts.forget(1)  # front-end 1 died with its reservations
    assert counts.depth == 2
    counts.set_engine_depth(0)
    context = spawn_context()
    results = context.Queue()
    workers = [
        context.Process(target=_hammer, args=(counts, slot, 2000, results)) for slot in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sum(admitted for admitted, _ in outcomes) > 0
    assert all(over == 0 for _, over in outcomes)
    assert counts.depth == 0


# ---------------------------------------------------------------- both ends, one loop


@dataclass
class Pair:
    engine: FakeEngine
    core: EngineCore
    server: EngineServer
    client: RemoteEngine
    client_metrics: ServiceMetrics


@asynccontextmanager
async def connected(package: Path, **overrides: object) -> AsyncIterator[Pair]:
    settings = Settings(model_dir=package, **overrides)  # type: ignore[arg-type]
    fake = FakeEngine(num_classes=1000, embedding_dim=2048)
    admission = AdmissionCounts.create(settings.max_queue_size)
    engine_metrics, client_metrics = ServiceMetrics(), ServiceMetrics()
    core = EngineCore(
        settings, engine_metrics, fake.factory, observer=SharedDepth(engine_metrics, admission)
    )
    directory = tempfile.mkdtemp()
    server = EngineServer(core, engine_metrics, admission, f"{directory}/engine.sock", 1)
    await server.start()
    await core.load()
    client = RemoteEngine(settings, client_metrics, server.socket_path, admission, 5, 1 << 24)
    await client.start()
    assert await asyncio.wait_for(client.wait_settled(), 10) is EngineState.READY
    try:
        yield Pair(fake, core, server, client, client_metrics)
    finally:
        await client.close(1)
        await server.stop()
        await core.close(1)


def photo_pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)


def test_pixels_and_encoded_images_come_back_as_the_engine_computed_them(
    package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    jpeg = next(iter(photo_jpegs.values()))

    async def scenario() -> None:
        async with connected(package) as pair:
            pixels = [photo_pixels(seed) for seed in range(3)]
            with pair.client.reserve(4) as slots:
                futures = slots.submit([*pixels, jpeg], 1e12, ALL_OUTPUTS)
            done = await asyncio.gather(*futures)
            stacked = np.concatenate(pair.engine.batches)
            expected_logits, expected_embedding = FakeEngine(1000, 2048).run(stacked)
            rows = {bytes(image.tobytes()): index for index, image in enumerate(stacked)}
            for image, result in zip(pixels, done[:3], strict=True):
                row = rows[image.tobytes()]
                np.testing.assert_array_equal(result.value.logits, expected_logits[row])
                np.testing.assert_array_equal(result.value.embedding, expected_embedding[row])
                assert result.batch_size >= 1
            assert done[3].value.decode_s > 0  # decoded by the engine, in the batch
            assert pair.server.admission.depth == 0

    asyncio.run(scenario())


def test_only_the_outputs_asked_for_travel_back(package: Path) -> None:
    async def scenario() -> None:
        async with connected(package) as pair:
            with pair.client.reserve(1) as slots:
                (future,) = slots.submit([photo_pixels(1)], 1e12, frozenset({LOGITS}))
            result = await future
            assert result.value.logits.shape == (1000,)
            assert result.value.embedding.size == 0
            with pair.client.reserve(1) as slots:
                (future,) = slots.submit([photo_pixels(1)], 1e12, frozenset({EMBEDDING}))
            result = await future
            assert result.value.logits.size == 0
            assert result.value.embedding.shape == (2048,)

    asyncio.run(scenario())


def test_a_bad_image_fails_alone_with_its_own_error(package: Path) -> None:
    async def scenario() -> None:
        async with connected(package) as pair:
            with pair.client.reserve(2) as slots:
                good, bad = slots.submit([photo_pixels(2), b"not an image"], 1e12, ALL_OUTPUTS)
            assert (await good).value.logits.shape == (1000,)
            with pytest.raises(InvalidImage) as failed:
                await bad
            assert failed.value.status == 400

    asyncio.run(scenario())


def test_a_cancelled_request_is_skipped_and_its_block_reused_only_after_its_result(
    package: Path,
) -> None:
    async def scenario() -> None:
        async with connected(package, max_batch_size=1, max_concurrent_batches=1) as pair:
            pair.engine.gate = threading.Event()
            with pair.client.reserve(1) as slots:
                (running,) = slots.submit([photo_pixels(3)], 1e12, ALL_OUTPUTS)
            await asyncio.to_thread(pair.engine.running.wait, 10)
            with pair.client.reserve(1) as slots:
                (queued,) = slots.submit([photo_pixels(4)], 1e12, ALL_OUTPUTS)
            queued.cancel()
            await asyncio.sleep(0.1)  # the Cancel reaches the engine before the gate opens
            in_use = pair.client._arena.bytes_in_use
            assert in_use > 0  # both blocks held: the engine has not answered either
            pair.engine.gate.set()
            await running
            for _ in range(100):
                if pair.client._arena.bytes_in_use == 0:
                    break
                await asyncio.sleep(0.02)
            assert pair.client._arena.bytes_in_use == 0
            assert len(pair.engine.batches) == 1  # the cancelled image never ran
            text = render(await pair.server.collect(), None)[0].decode()
            assert metric_value(text, "resnet_skipped_images_total", {"reason": "abandoned"}) == 1

    asyncio.run(scenario())


def test_when_the_engine_goes_every_request_in_flight_fails_at_once(package: Path) -> None:
    async def scenario() -> None:
        async with connected(package) as pair:
            pair.engine.gate = threading.Event()
            with pair.client.reserve(2) as slots:
                futures = slots.submit([photo_pixels(5), photo_pixels(6)], 1e12, ALL_OUTPUTS)
            await asyncio.to_thread(pair.engine.running.wait, 10)
            await pair.server.stop()  # the engine's side of every connection closes
            outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 2)
            assert all(isinstance(outcome, EngineUnavailable) for outcome in outcomes)
            assert pair.client.state is EngineState.GONE
            assert not await pair.client.alive(1)
            with pytest.raises(EngineUnavailable):
                pair.client.reserve(1)
            pair.engine.gate.set()

    asyncio.run(scenario())


def test_metrics_are_merged_from_both_sides(package: Path) -> None:
    async def scenario() -> None:
        async with connected(package) as pair:
            pair.client_metrics.requests.labels("predict", "200").inc(3)
            pair.client_metrics.requests_in_progress.inc(2)
            assert await pair.client.alive(2)
            with pair.client.reserve(1) as slots:
                (future,) = slots.submit([photo_pixels(7)], 1e12, ALL_OUTPUTS)
            await future
            text = render(await pair.client.server_metrics(), None)[0].decode()
            labels = {"endpoint": "predict", "status": "200"}
            assert metric_value(text, "resnet_requests_total", labels) == 3
            assert metric_value(text, "resnet_requests_in_progress") == 2
            assert metric_value(text, "resnet_batch_size_count") == 1
            assert metric_value(text, "resnet_ready") == 1
            assert metric_value(text, "resnet_queue_capacity") == 256
            assert text.count("resnet_model_info{") == 1

    asyncio.run(scenario())
