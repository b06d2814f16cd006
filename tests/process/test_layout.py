"""How many processes serve when `--workers` is not set (service/layout.py): the engine is
opened and timed first; a CPU engine that does at most `ONE_PROCESS_MAX_IMAGES_S` serves
in one process, on the engine already opened; a cheaper one gets the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service import layout as layout_module
from service.config import Settings
from service.cpus import CpuLimit, auto_workers, cpu_limit
from service.frontend.app import create_app
from service.layout import ONE_PROCESS_MAX_IMAGES_S, choose_layout
from service.model_package import ModelPackage, Precision
from tests.process.servers import JPEG, multi_process_server
from tests.support import FakeEngine, running_server


@dataclass
class TimedEngine(FakeEngine):
    """A test engine whose warm-up reports a lone image's time, as the real ones do."""

    ms_per_image: float = 1.0
    warm_ups: list[list[int]] = field(default_factory=list)

    def warm_up(self, batch_sizes: list[int]) -> float:  # type: ignore[override]
        self.warm_ups.append(list(batch_sizes))
        return self.ms_per_image


def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout_module, "cpu_limit", lambda: CpuLimit(2.0, "test", None))


def settings_for(package: Path, **values: object) -> Settings:
    return Settings(model_dir=package, engine_instances=2, **values)  # type: ignore[arg-type]


def test_an_expensive_cpu_engine_serves_in_one_process_on_the_engine_it_timed(
    cheap_package: Path, photo_jpegs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    two_cpus(monkeypatch)
    package = ModelPackage.load(cheap_package)
    engine = TimedEngine(package.manifest.num_classes, package.manifest.embedding_dim)
    engine.ms_per_image = 2 * 1000 / ONE_PROCESS_MAX_IMAGES_S  # two instances: exactly at it
    opened: list[int] = []

    def open_engine(settings: Settings, package: ModelPackage) -> object:
        opened.append(1)
        return engine, Precision.FP32, []

    settings = settings_for(cheap_package)
    layout = choose_layout(settings, package, open_engine)  # type: ignore[arg-type]
    assert layout.workers == 0
    assert "100 img/s on 2 instance(s)" in layout.reason
    assert "one process" in layout.reason
    assert layout.engine_factory is not None
    assert engine.warm_ups == [[1]]
    # The one process serves on that engine: not opened a second time.
    with running_server(create_app(settings, engine_factory=layout.engine_factory)) as url:
        body = next(iter(photo_jpegs.values()))
        response = httpx.post(f"{url}/predict", content=body, headers=JPEG, timeout=30)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    assert opened == [1]
    assert len(engine.batches) == 1
    assert engine.batches[0].shape[0] == 1
    assert len(engine.warm_ups) == 2  # the app's own warm-up, every batch size, on it


def test_a_cheap_cpu_engine_gets_the_front_ends_and_is_let_go(
    cheap_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_cpus(monkeypatch)
    package = ModelPackage.load(cheap_package)
    engine = TimedEngine(package.manifest.num_classes, ms_per_image=2 * 1000 / 101)
    layout = choose_layout(
        settings_for(cheap_package),
        package,
        lambda settings, package: (engine, Precision.FP32, []),
    )
    assert layout.workers == auto_workers(CpuLimit(2.0, "test", None)) == 2
    assert layout.engine_factory is None
    assert "more than 100: 2 front-end(s)" in layout.reason


def test_set_workers_and_one_cpu_open_nothing(
    cheap_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = ModelPackage.load(cheap_package)

    def must_not_open(settings: Settings, package: ModelPackage) -> object:
        raise AssertionError("the engine was opened")

    for workers in (0, 3):
        chosen = choose_layout(settings_for(cheap_package, workers=workers), package, must_not_open)  # type: ignore[arg-type]
        assert (chosen.workers, chosen.reason) == (workers, "--workers set")
    monkeypatch.setattr(layout_module, "cpu_limit", lambda: CpuLimit(1.0, "test", 1.0))
    chosen = choose_layout(settings_for(cheap_package), package, must_not_open)  # type: ignore[arg-type]
    assert chosen.workers == 0
    assert "1 CPU" in chosen.reason


def test_an_engine_that_cannot_open_leaves_the_failure_to_the_engine_process(
    cheap_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_cpus(monkeypatch)

    def broken(settings: Settings, package: ModelPackage) -> object:
        raise RuntimeError("no such provider")

    chosen = choose_layout(settings_for(cheap_package), ModelPackage.load(cheap_package), broken)  # type: ignore[arg-type]
    assert chosen.workers == 2
    assert "could not be opened to time it (no such provider)" in chosen.reason


def test_the_cli_times_the_real_engine_and_says_what_it_chose(
    cheap_package: Path, photo_jpegs: dict[str, bytes]
) -> None:
    """The cheap-engine package costs microseconds an image on any CPU: the split, with
    one front-end per CPU, told in the start log and in /info."""
    expected = auto_workers(cpu_limit())
    with multi_process_server(cheap_package, workers=None) as (process, url):
        processes = httpx.get(f"{url}/info", timeout=10).json()["processes"]
        if expected > 1:
            assert processes["workers"] == expected
            assert processes["workers_chosen"] == "auto"
            assert f"more than 100: {expected} front-end(s)" in processes["layout"]
        else:  # a one-CPU machine: one process, whatever the engine costs
            assert processes["workers"] == 0
        body = next(iter(photo_jpegs.values()))
        response = httpx.post(f"{url}/predict", content=body, headers=JPEG, timeout=30)
        assert response.status_code == 200, response.text
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert "img/s on" in output or expected <= 1, output
