"""The CPU count behind every automatic thread setting: cgroup quotas (v2 and v1, fake files)
and affinity masks, and the thread plan sized from them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.cpus import CpuLimit, cpu_limit, plan_threads
from service.engine.policy import device_policy
from service.frontend.app import create_app
from service.model_package import ModelPackage
from tests.support import FakeEngine, png, running_server


def cgroup_v2(tmp_path: Path, limits: dict[str, str], own: str = "kubepods/pod/app") -> Path:
    """A fake unified hierarchy: `cpu.max` contents by cgroup path, and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    (root / own).mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, value in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(value + "\n")
    (tmp_path / "proc-cgroup").write_text(f"0::/{own}\n")
    return root


def limit_v2(tmp_path: Path, limits: dict[str, str], cores: int) -> CpuLimit:
    root = cgroup_v2(tmp_path, limits)
    return cpu_limit(root, tmp_path / "proc-cgroup", affinity=lambda: cores)


@pytest.mark.parametrize(
    ("cores", "instances", "threads", "solo"),
    [(1, 1, 1, 1), (2, 2, 1, 2), (4, 2, 2, 4), (8, 2, 4, 8), (16, 4, 4, 16), (64, 16, 4, 64)],
)
def test_without_a_quota_the_affinity_mask_counts(
    tmp_path: Path, cores: int, instances: int, threads: int, solo: int
) -> None:
    limit = limit_v2(tmp_path, {"kubepods/pod/app": "max 100000"}, cores)
    assert limit == CpuLimit(float(cores), "affinity mask", None)
    plan = plan_threads(limit)
    assert (plan.instances, plan.intra_op_threads, plan.solo_threads) == (instances, threads, solo)
    assert plan.instances * plan.intra_op_threads == cores  # every core, none twice
    assert plan.decode_workers == min(8, cores)
    assert plan.spinning


@pytest.mark.parametrize(
    ("cpu_max", "cpus", "threads", "decode"),
    [
        ("50000 100000", 0.5, (1, 1, 1), 1),
        ("200000 100000", 2.0, (2, 1, 2), 2),
        ("600000 100000", 6.0, (2, 3, 6), 6),
    ],
)
def test_a_quota_on_a_64_core_host_sizes_the_threads(
    tmp_path: Path, cpu_max: str, cpus: float, threads: tuple[int, int, int], decode: int
) -> None:
    limit = limit_v2(tmp_path, {"kubepods/pod/app": cpu_max}, cores=64)
    assert limit.cpus == cpus
    assert limit.source == "cgroup v2 cpu.max"
    plan = plan_threads(limit)
    assert (plan.instances, plan.intra_op_threads, plan.solo_threads) == threads
    assert plan.decode_workers == decode
    # One thread on half a CPU would spin through the quota: spinning goes off there only.
    assert plan.spinning is (plan.instances * plan.intra_op_threads <= cpus)


def test_a_quota_of_10_cpus_gets_two_instances_of_5_threads(tmp_path: Path) -> None:
    limit = limit_v2(tmp_path, {"kubepods/pod/app": "1000000 100000"}, cores=64)
    plan = plan_threads(limit)
    assert (plan.instances, plan.intra_op_threads, plan.solo_threads) == (2, 5, 10)
    assert plan.spinning  # 2 x 5 threads fit the 10-CPU quota


def test_the_tightest_quota_on_the_path_to_the_root_applies(tmp_path: Path) -> None:
    limits = {"kubepods": "max 100000", "kubepods/pod": "300000 100000", "kubepods/pod/app": "max"}
    assert limit_v2(tmp_path, limits, cores=64).cpus == 3.0


def test_an_affinity_mask_smaller_than_the_quota_wins(tmp_path: Path) -> None:
    limit = limit_v2(tmp_path, {"kubepods/pod/app": "600000 100000"}, cores=4)
    assert limit == CpuLimit(4.0, "affinity mask", 6.0)
    assert plan_threads(limit).spinning  # 4 threads stay within the 6-CPU quota


@pytest.mark.parametrize(
    ("quota", "expected"), [("150000", 1.5), ("-1", 16.0)], ids=["quota", "unlimited"]
)
def test_cgroup_v1_quota(tmp_path: Path, quota: str, expected: float) -> None:
    cpu = tmp_path / "cgroup" / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text(quota + "\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    limit = cpu_limit(tmp_path / "cgroup", tmp_path / "none", affinity=lambda: 16)
    assert limit.cpus == expected
    assert limit.whole == int(expected)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    limit = cpu_limit(tmp_path / "absent", tmp_path / "absent-too", affinity=lambda: 3)
    assert limit == CpuLimit(3.0, "affinity mask", None)


def test_explicit_settings_win_and_spinning_follows_the_threads() -> None:
    quota_2 = CpuLimit(2.0, "cgroup v2 cpu.max", 2.0)
    plan = plan_threads(quota_2, intra_op_threads=8, decode_workers=3)
    assert (plan.intra_op_threads, plan.decode_workers, plan.spinning) == (8, 3, False)
    assert plan_threads(quota_2, intra_op_threads=8, allow_spinning=True).spinning
    assert not plan_threads(quota_2, allow_spinning=False).spinning
    one = plan_threads(quota_2, instances=1)
    assert (one.instances, one.intra_op_threads, one.solo_threads, one.spinning) == (1, 2, 2, True)
    assert not plan_threads(quota_2, intra_op_threads=2).spinning  # 2 instances x 2 > 2


def test_a_gpu_gets_one_instance_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.config.cpu_limit", lambda: CpuLimit(16.0, "affinity mask", None))
    assert Settings().thread_plan().instances == 4
    assert Settings().thread_plan(gpu=True).instances == 1
    assert Settings(engine_instances=3).thread_plan(gpu=True).instances == 3


def test_info_shows_the_plan(resnet18_package: Path) -> None:
    engine = FakeEngine(num_classes=ModelPackage.load(resnet18_package).manifest.num_classes)
    settings = Settings(model_dir=resnet18_package, decode_workers=3)
    app = create_app(settings, engine_factory=engine.factory)
    with running_server(app) as url:
        threads = httpx.get(f"{url}/info").json()["threads"]
    expected = cpu_limit()
    assert threads["cpus"] == round(expected.cpus, 3)
    assert threads["cpus_source"] == expected.source
    plan = plan_threads(expected, decode_workers=3)
    assert threads["engine_instances"] == plan.instances
    assert threads["intra_op_threads"] == plan.intra_op_threads
    assert threads["solo_threads"] == plan.solo_threads
    assert threads["decode_workers"] == 3
    assert isinstance(threads["spinning"], bool)


@pytest.mark.parametrize("solo", [True, False])
def test_a_lone_request_runs_alone_where_the_engine_has_a_solo_session(
    resnet18_package: Path, solo: bool
) -> None:
    classes = ModelPackage.load(resnet18_package).manifest.num_classes
    engine = FakeEngine(num_classes=classes, has_solo_session=solo)
    app = create_app(Settings(model_dir=resnet18_package), engine_factory=engine.factory)
    with running_server(app) as url:
        for _ in range(2):
            response = httpx.post(
                f"{url}/predict", content=png(), headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200, response.text
    assert engine.alone == [solo, solo]


@pytest.mark.parametrize(
    ("cpus", "flags", "device", "expected"),
    [
        (2.0, {}, "cpu", (2, True, True)),
        (16.0, {}, "cpu", (4, True, True)),
        (2.0, {"engine_instances": 1}, "cpu", (1, True, True)),
        (2.0, {"max_concurrent_batches": 3}, "cpu", (3, True, True)),
        (2.0, {"partial_batches_while_busy": False}, "cpu", (2, False, True)),
        (16.0, {}, "cuda", (2, True, False)),
        (16.0, {"max_concurrent_batches": 3, "overlap_decode": False}, "cuda", (3, True, True)),
    ],
)
def test_the_device_policy_follows_the_plan(
    cpus: float, flags: dict[str, int], device: str, expected: tuple[int, bool, bool]
) -> None:
    settings = Settings(**flags)
    plan = plan_threads(CpuLimit(cpus, "affinity mask", None), instances=settings.engine_instances)
    policy = device_policy(settings, plan, device)
    assert (
        policy.concurrent_batches,
        policy.partial_batches_while_busy,
        policy.decode_in_batch,
    ) == expected


def test_a_batch_beside_a_running_one_is_small_on_cpus_only() -> None:
    plan = plan_threads(CpuLimit(2.0, "affinity mask", None))  # 2 instances of 1 thread
    assert device_policy(Settings(), plan, "cpu").busy_batch_size == 1
    four = plan_threads(CpuLimit(4.0, "affinity mask", None))  # 2 instances of 2 threads
    assert device_policy(Settings(), four, "cpu").busy_batch_size == 4
    sixteen = plan_threads(CpuLimit(16.0, "affinity mask", None))  # 4 instances of 4 threads
    assert device_policy(Settings(), sixteen, "cpu").busy_batch_size == 8
    assert device_policy(Settings(max_batch_size=4), sixteen, "cpu").busy_batch_size == 4
    assert device_policy(Settings(max_batch_size=1), plan, "cpu").busy_batch_size == 1
    assert device_policy(Settings(busy_batch_size=5), plan, "cpu").busy_batch_size == 5
    assert device_policy(Settings(max_batch_size=64), plan, "cuda").busy_batch_size == 64
