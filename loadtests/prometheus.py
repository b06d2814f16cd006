"""A real Prometheus server for tests and the dashboard snapshot: 127.0.0.1 only, a
temporary TSDB, scraping given targets with the project's scrape config and rules, and
the PromQL of the dashboard and the rules, ready to run against it.

Needs `prometheus` on PATH (Debian's `prometheus` package; scripts/install-prometheus.sh).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "resnet-serve-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "resnet-serve-rules.yaml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOB = "resnet-serve"

# What Grafana would put in place of its variables for this run.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$job": JOB,
    "$pod": ".*",
}


@dataclass(frozen=True)
class Query:
    source: str  # "panel" or "record" or "alert"
    title: str  # panel title (with legend) or rule name
    expr: str  # as written
    promql: str  # with Grafana's variables substituted


def grafana_to_promql(expr: str) -> str:
    # Longest names first, so $__rate_interval is not read as $__range + "te_interval".
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    if "$" in re.sub(r"\{\{.*?\}\}", "", expr):
        raise ValueError(f"an unknown Grafana variable in {expr!r}")
    return expr


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            title = f"{panel['title']} [{target['refId']}: {target.get('legendFormat', '')}]"
            queries.append(Query("panel", title, target["expr"], grafana_to_promql(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):  # label_values(...) is Grafana's, not PromQL: the selector
            inner = re.fullmatch(r"label_values\((.*), *\w+\)", query["query"])
            if inner is None:
                raise ValueError(f"unexpected variable query {query['query']!r}")
            expr = inner.group(1)
            queries.append(Query("variable", variable["name"], expr, grafana_to_promql(expr)))
    return queries


def rule_queries(path: Path = RULES) -> list[Query]:
    queries = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            kind = "alert" if "alert" in rule else "record"
            expr = rule["expr"].strip()
            queries.append(Query(kind, rule.get("alert") or rule["record"], expr, expr))
    return queries


class Prometheus:
    """A running server's HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; raises ValueError with Prometheus' message when it fails."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = self.http.get("/api/v1/query", params=params).json()
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return list(body["data"]["result"])

    def query_range(
        self, promql: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {
            "query": promql,
            "start": start,
            "end": end,
            "step": step_s,
        }
        body = self.http.get("/api/v1/query_range", params=params).json()
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return list(body["data"]["result"])

    def exemplars(self, promql: str, start: float, end: float) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": promql, "start": start, "end": end}
        body = self.http.get("/api/v1/query_exemplars", params=params).json()
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return list(body["data"] or [])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.http.get("/api/v1/targets").json()["data"]["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        groups = self.http.get("/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def wait_until(self, promql: str, timeout_s: float) -> list[dict[str, Any]]:
        """Poll (bounded) until `promql` returns a sample; the samples, or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {promql!r} within {timeout_s} s")
            time.sleep(0.5)

    def close(self) -> None:
        self.http.close()


def scrape_config(
    targets: list[str], interval_s: float, rules: Path = RULES, source: Path = SCRAPE_CONFIG
) -> dict[str, Any]:
    """A scrape config of the project's (deploy/prometheus/prometheus.yml unless `source`
    names another, e.g. the compose stack's) with our targets, a short interval and the
    rules."""
    config = yaml.safe_load(source.read_text())
    config["global"]["scrape_interval"] = f"{interval_s:g}s"
    config["global"]["evaluation_interval"] = f"{interval_s:g}s"
    config["rule_files"] = [str(rules)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    job["static_configs"] = [{"targets": targets}]
    return config


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@contextmanager
def running_prometheus(
    targets: list[str],
    interval_s: float = 1.0,
    timeout_s: float = 30.0,
    source: Path = SCRAPE_CONFIG,
) -> Iterator[Prometheus]:
    """Prometheus on a free 127.0.0.1 port with a temporary TSDB, scraping `targets`
    (host:port) every `interval_s` with the project's rules loaded and the `resnet-serve`
    job of `source`; stopped on exit."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not on PATH (scripts/install-prometheus.sh)")
    with tempfile.TemporaryDirectory(prefix="resnet-prometheus-") as tmp:
        directory = Path(tmp)
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(scrape_config(targets, interval_s, source=source)))
        port = free_port()
        log_path = directory / "prometheus.log"
        command = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--enable-feature=exemplar-storage",
        ]
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = Prometheus(f"http://127.0.0.1:{port}")
        try:
            _wait_ready(server, process, timeout_s, log_path)
            yield server
        finally:
            server.close()
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _wait_ready(
    server: Prometheus, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if server.http.get("/-/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus not ready in {timeout_s} s:\n{log_path.read_text()}")
        time.sleep(0.2)
