"""The dashboard and the rules against a real Prometheus scraping a live service.

One server (ResNet-18) and one Prometheus for the module: real traffic flows (good, bad
and rejected requests, under concurrency), Prometheus scrapes every second with the
project's scrape config and rules, and then every PromQL expression of the dashboard and
of the rules must parse and (panels) return data. promtool checks and unit-tests the
rules. The service is traced (in-memory spans) so that Prometheus stores trace ids as
exemplars. Without prometheus/promtool these tests skip, except under CI=true, where they
fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from loadtests.prometheus import (
    DASHBOARD,
    JOB,
    RULES,
    Prometheus,
    Query,
    dashboard_queries,
    rule_queries,
    running_prometheus,
)
from loadtests.server import free_port, wait_ready
from service.config import Settings
from service.frontend.app import create_app
from service.observability import metrics as metrics_module
from service.observability import tracing
from tests.support import running_server

ROOT = Path(__file__).resolve().parents[2]
GPU_METRICS = ("resnet_gpu_",)
TRAFFIC_S = 6.0  # seconds of steady concurrent load


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found: run scripts/install-prometheus.sh (Debian's prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _require("promtool")


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    tests = RULES.with_name("resnet-serve-rules.test.yaml")
    result = subprocess.run(
        [promtool, "test", "rules", tests.name],
        cwd=tests.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {q.title for q in rule_queries() if q.source == "alert"}
    text = tests.read_text()
    untested = sorted(name for name in alerts if f"alertname: {name}" not in text)
    assert not untested, f"alerts without a promtool test: {untested}"


def test_promtool_checks_the_scrape_config(promtool: str) -> None:
    config = RULES.with_name("prometheus.yml")
    result = subprocess.run(
        [promtool, "check", "config", config.name],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_scrape_config_labels_each_replica_by_pod() -> None:
    """The compose stack's Prometheus job, run by a real Prometheus against a live target:
    its series carry `job` and the `pod` label the dashboard and the rules group by."""
    _require("prometheus")
    registry = CollectorRegistry()
    Gauge("resnet_ready", "1 when ready", registry=registry).set(1)
    server, thread = start_http_server(0, "127.0.0.1", registry)
    target = f"127.0.0.1:{server.server_address[1]}"
    compose = ROOT / "deploy" / "compose" / "prometheus.yaml"
    try:
        with running_prometheus([target], interval_s=1.0, source=compose) as prometheus:
            (sample,) = prometheus.wait_until(f'resnet_ready{{job="{JOB}"}}', timeout_s=15)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert sample["metric"]["pod"] == target


@dataclass
class Traffic:
    statuses: dict[int, int]


async def _drive(url: str, jpegs: list[bytes]) -> Traffic:
    """Steady concurrent load, then bad requests, then a burst past the queue's capacity.
    Every loop is bounded in count and time."""
    statuses: dict[int, int] = {}

    def count(response: httpx.Response) -> None:
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def worker(index: int) -> None:
            stop = time.monotonic() + TRAFFIC_S
            for n in range(200):
                if time.monotonic() > stop:
                    return
                data = jpegs[(index + n) % len(jpegs)]
                if n % 3 == 2:
                    files = [("files", ("a.jpg", data, "image/jpeg"))] * 2
                    count(await http.post("/embed", files=files))
                else:
                    headers = {"content-type": "image/jpeg"}
                    count(await http.post("/predict", content=data, headers=headers))

        await asyncio.gather(*(worker(i) for i in range(6)))
        bad = [
            http.post("/predict", content=b"not an image", headers={"content-type": "image/jpeg"}),
            http.post("/predict", content=jpegs[0], headers={"content-type": "text/plain"}),
            http.post("/predict?top_k=0", content=jpegs[0], headers={"content-type": "image/jpeg"}),
            http.post("/embed?encoding=hex", files=[("files", ("a.jpg", jpegs[0], "image/jpeg"))]),
        ]
        for response in await asyncio.gather(*bad):
            count(response)
        burst = [
            http.post(
                "/embed", files=[("files", ("a.jpg", jpegs[i % len(jpegs)], "image/jpeg"))] * 4
            )
            for i in range(24)
        ]
        for response in await asyncio.gather(*burst):
            count(response)
    return Traffic(statuses)


@dataclass
class Live:
    prometheus: Prometheus
    traffic: Traffic
    started: float
    finished: float


SERVER_SETTINGS = {
    "precision": "fp32",
    "max_batch_size": 4,
    "busy_batch_size": 4,  # batches of several images (on 2 CPUs the default takes one)
    "max_queue_size": 8,
    "warmup_batch_sizes": [1, 4],
}


@contextmanager
def _one_process(package: Path) -> Iterator[str]:
    """The app in this process, traced (spans kept in memory)."""
    app = create_app(Settings(model_dir=package, **SERVER_SETTINGS))  # type: ignore[arg-type]
    app.state.tracing = tracing.instrument(app, "test", exporter=InMemorySpanExporter())
    try:
        with running_server(app) as url:
            yield url
    finally:
        metrics_module.set_exemplar_source(None)
        app.state.tracing.shutdown()


@contextmanager
def _front_ends(package: Path, log_dir: Path) -> Iterator[str]:
    """`resnet-serve` with an engine process and two front-ends, traced to its log: the
    figures Prometheus scrapes from any front-end are the whole server's."""
    flags = []
    for name, value in SERVER_SETTINGS.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "--model-dir", str(package), "--port", str(port),
        "--workers", "2", "--log-level", "warning", *flags,
    ]  # fmt: skip
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "test"}
    with (log_dir / "server.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(process, port, 120, f"see {log_dir / 'server.log'}")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(60)


@pytest.fixture(scope="module", params=["one process", "two front-ends"])
def live(
    request: pytest.FixtureRequest,
    resnet18_package: Path,
    distinct_jpegs: list[bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    _require("prometheus")
    if request.param == "one process":
        server = _one_process(resnet18_package)
    else:
        server = _front_ends(resnet18_package, tmp_path_factory.mktemp("front-ends"))
    with server as url:
        target = url.removeprefix("http://")
        with running_prometheus([target], interval_s=1.0) as prometheus:
            prometheus.wait_until(f'up{{job="{JOB}"}} == 1', timeout_s=15)
            started = time.time()
            traffic = asyncio.run(_drive(url, distinct_jpegs))
            # Two scrapes after the traffic, and the rules evaluated on them.
            time.sleep(2.5)
            prometheus.wait_until(f'job:resnet_images:rate5m{{job="{JOB}"}} > 0', timeout_s=15)
            yield Live(prometheus, traffic, started, time.time())


def _run(prometheus: Prometheus, query: Query) -> tuple[str, list[dict]]:
    try:
        return "", prometheus.query(query.promql)
    except ValueError as error:
        return str(error), []


def _summary(result: list[dict]) -> str:
    def value(sample: dict) -> str:
        number = float(sample["value"][1])
        return f"{number:.4g}"

    shown = ", ".join(
        "{"
        + ",".join(f"{k}={v}" for k, v in s["metric"].items() if k not in ("job", "instance"))
        + "} "
        + value(s)
        for s in result[:4]
    )
    more = f" (+{len(result) - 4} more)" if len(result) > 4 else ""
    return f"{len(result)} series: {shown}{more}"


def test_traffic_included_good_bad_and_rejected_requests(live: Live) -> None:
    statuses = live.traffic.statuses
    print("statuses sent:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) > 20
    assert sum(n for status, n in statuses.items() if 400 <= status < 429) >= 4
    assert statuses.get(429, 0) > 0, "the burst never filled the queue"


def test_the_target_is_scraped_with_the_dashboard_labels(live: Live) -> None:
    (target,) = live.prometheus.targets()
    assert target["health"] == "up", target
    assert target["labels"]["job"] == JOB
    assert target["labels"]["pod"] == target["labels"]["instance"]


def test_every_rule_is_loaded_and_evaluates(live: Live) -> None:
    loaded = live.prometheus.rules()
    assert len(loaded) == len(rule_queries())
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
    assert not unhealthy


def test_every_dashboard_query_parses_and_returns_data(live: Live) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 25
    failures = []
    for query in queries:
        error, result = _run(live.prometheus, query)
        gpu = any(name in query.expr for name in GPU_METRICS)
        print(f"{query.source:8} {query.title}: {error or _summary(result)}")
        if error:
            failures.append(f"{query.title}: {error}")
        elif gpu and result:
            failures.append(f"{query.title}: GPU series on a CPU-only run: {result}")
        elif not gpu and not result:
            failures.append(f"{query.title}: no data for {query.promql}")
    assert not failures, "\n".join(failures)


def test_every_rule_expression_parses_and_records(live: Live) -> None:
    failures = []
    for query in rule_queries():
        error, result = _run(live.prometheus, query)
        print(f"{query.source:8} {query.title}: {error or _summary(result)}")
        if error:
            failures.append(f"{query.title}: {error}")
        elif query.source == "record" and not result:
            failures.append(f"{query.title}: records nothing")
    assert not failures, "\n".join(failures)
    # The test model has random weights: that alert's condition holds. No 5xx, no failed
    # batch and a ready pod: those conditions must not. (Latency and the queue depend on
    # how busy the shared CI machine is: reported, not asserted.)
    firing = {
        query.title
        for query in rule_queries()
        if query.source == "alert" and _run(live.prometheus, query)[1]
    }
    print("alert conditions holding:", sorted(firing))
    assert "ResnetServeUntrainedModel" in firing
    assert not firing & {
        "ResnetServeHigh5xxRatio",
        "ResnetServeBatchesFailing",
        "ResnetServePodNotReady",
    }
    states = {
        rule["name"]: rule["state"]
        for rule in live.prometheus.rules()
        if rule["type"] == "alerting"
    }
    print("alert states:", states)
    assert states["ResnetServeUntrainedModel"] in ("pending", "firing")


def test_metrics_moved_as_the_traffic_says(live: Live) -> None:
    query = live.prometheus.query
    sel = f'job="{JOB}"'

    def total(promql: str) -> float:
        return sum(float(sample["value"][1]) for sample in query(promql))

    batches = total(f"sum(resnet_batch_size_count{{{sel}}})")
    singles = total(f'sum(resnet_batch_size_bucket{{{sel}, le="1.0"}})')
    assert batches - singles > 0, "no batch above 1 image under concurrency"
    statuses = live.traffic.statuses
    assert total(f'sum(resnet_rejections_total{{{sel}, reason="queue_full"}})') == statuses[429]
    assert total(f'sum(resnet_rejections_total{{{sel}, reason="bad_input"}})') == sum(
        n for status, n in statuses.items() if 400 <= status < 429
    )
    assert total(f'sum(resnet_requests_total{{{sel}, status="200"}})') == statuses[200]
    assert total(f"sum(resnet_model_load_seconds{{{sel}}})") > 0
    # The stage series agree with each other: one queue wait per image run, one engine
    # run per batch, every image run answered, each one decoded, nothing left in flight.
    images_run = total(f"sum(resnet_batch_size_sum{{{sel}}})")
    assert images_run == total(f"sum(resnet_queue_wait_seconds_count{{{sel}}})")
    assert images_run == total(f"sum(resnet_images_total{{{sel}}})")
    assert total(f"sum(resnet_decode_duration_seconds_count{{{sel}}})") >= images_run
    assert batches == total(f"sum(resnet_inference_duration_seconds_count{{{sel}}})")
    assert batches == total(f'sum(resnet_batches_total{{{sel}, outcome="ok"}})')
    assert total(f"sum(resnet_requests_in_progress{{{sel}}})") == 0
    assert total(f"sum(resnet_queue_depth{{{sel}}})") == 0
    assert total(f"max(resnet_queue_capacity{{{sel}}})") == 8
    assert total(f"sum(resnet_ready{{{sel}}})") == 1
    assert not query(f'{{__name__=~".+_created", {sel}}}'), "*_created series are exposed"


def test_prometheus_stores_trace_ids_as_exemplars_of_request_latency(live: Live) -> None:
    found = live.prometheus.exemplars(
        f'resnet_request_duration_seconds_bucket{{job="{JOB}"}}', live.started, live.finished
    )
    trace_ids = {
        exemplar["labels"]["trace_id"] for series in found for exemplar in series["exemplars"]
    }
    print(f"{len(trace_ids)} distinct trace ids as exemplars, e.g. {sorted(trace_ids)[:2]}")
    assert trace_ids
    assert all(len(trace_id) == 32 for trace_id in trace_ids)


def test_the_dashboard_is_what_its_generator_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_dashboard", Path(__file__).parents[2] / "scripts" / "build_dashboard.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run scripts/build_dashboard.py"


def test_every_alert_has_annotations_and_a_runbook_section() -> None:
    import yaml

    readme = (RULES.parent.parent / "README.md").read_text()
    anchors = {
        line.removeprefix("### ").strip().lower()
        for line in readme.splitlines()
        if line.startswith("### ")
    }
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            annotations = rule["annotations"]
            assert {"summary", "description", "runbook_url"} <= set(annotations), rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning")
            anchor = annotations["runbook_url"].rpartition("#")[2]
            assert anchor == rule["alert"].lower()
            assert anchor in anchors, f"no '### {rule['alert']}' in deploy/README.md"


@pytest.mark.parametrize(
    ("name", "kind", "endpoints"),
    [
        ("servicemonitor.yaml", "ServiceMonitor", "endpoints"),
        ("podmonitor.yaml", "PodMonitor", "podMetricsEndpoints"),
    ],
)
def test_operator_examples_give_the_dashboard_labels(name: str, kind: str, endpoints: str) -> None:
    """prometheus-operator is not run here: the examples are checked for what the
    dashboard and rules rely on (job=resnet-serve, pod from the pod's name)."""
    import yaml

    manifest = yaml.safe_load(RULES.with_name(name).read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == kind
    (endpoint,) = manifest["spec"][endpoints]
    assert endpoint["port"] == "metrics"
    relabel = endpoint["relabelings"]
    assert {"targetLabel": "job", "replacement": JOB} in relabel
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"} in relabel
