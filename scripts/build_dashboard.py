"""Write deploy/grafana/resnet-serve-dashboard.json, the Grafana dashboard for resnet-serve.

The JSON is the artifact (import it as is); this script is how it is kept consistent:
edit here, run `python scripts/build_dashboard.py`, commit both. A test checks that the
committed JSON is what this script writes, and runs every query against a real Prometheus.

Template variables: `datasource` (any Prometheus), `job` (default resnet-serve) and `pod`
(multi-select, All). Queries aggregate across the selected pods: latency quantiles are
`histogram_quantile` over `sum by (le)`, never an average of per-pod quantiles. The
"Fleet" row reads the recording rules of deploy/prometheus/resnet-serve-rules.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "resnet-serve-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="$job", pod=~"$pod"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return targets(
        *(
            (
                f"histogram_quantile({q}, sum by ({group}) "
                f"(rate({metric}_bucket{{{SEL}}}[{RATE}])))",
                f"p{round(q * 100)}{suffix}",
            )
            for q in qs
        )
    )


def status_ratio(status: str) -> str:
    """Per endpoint, the share of answers whose status matches the regex `status`."""
    matching = f'rate(resnet_requests_total{{{SEL}, status=~"{status}"}}[{RATE}])'
    return (
        f"sum by (endpoint) ({matching}) "
        f"/ sum by (endpoint) (rate(resnet_requests_total{{{SEL}}}[{RATE}]))"
    )


def timeseries(title: str, description: str, tgts: list, unit: str = "short", **opts: Any) -> Panel:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    custom.update(opts.pop("custom", {}))
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": custom},
            "overrides": opts.pop("overrides", []),
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **opts,
    }


def stat(
    title: str, description: str, expr: str, unit: str, thresholds: list | None = None
) -> Panel:
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, instant=True)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
    }


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def panels() -> list[Panel]:
    red_above = lambda v: [{"color": "green", "value": None}, {"color": "red", "value": v}]  # noqa: E731
    model_table = {
        "type": "table",
        "title": "Model and readiness per pod",
        "description": "What each pod serves (precision, trained or not, device) and whether it "
        "is ready (1) or not (0: loading, draining, failed). trained=false means random "
        "weights: meaningless answers.",
        "datasource": DS,
        "targets": [
            target(
                f"max by (pod, name, version, arch, precision, trained, device) "
                f"(resnet_model_info{{{SEL}}})",
                ref="A",
                instant=True,
                format="table",
            ),
            target(f"max by (pod) (resnet_ready{{{SEL}}})", ref="B", instant=True, format="table"),
        ],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value #A": True},
                    "renameByName": {"Value #B": "ready"},
                },
            },
        ],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
    }
    return [
        row("Fleet"),
        stat(
            "Ready pods",
            "Pods answering /readyz 200 (resnet_ready summed over the selected pods).",
            f"sum(resnet_ready{{{SEL}}})",
            "short",
            [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        stat(
            "Requests/s",
            "All answered requests on /predict and /embed, 5-minute rate.",
            'sum(job:resnet_requests:rate5m{job="$job"})',
            "reqps",
        ),
        stat(
            "5xx ratio",
            "Share of requests answered 5xx over 5 minutes (the ResnetServeHigh5xxRatio alert "
            "fires above 5%).",
            'max(job:resnet_requests_5xx:ratio_rate5m{job="$job"})',
            "percentunit",
            red_above(0.05),
        ),
        stat(
            "p99 latency",
            "Worst endpoint's p99 request latency over 5 minutes (alert above 1 s).",
            "max(job_endpoint:resnet_request_duration_seconds:histogram_quantile"
            '{job="$job", quantile="0.99"})',
            "s",
            red_above(1),
        ),
        stat(
            "Images/s",
            "Images answered successfully, 5-minute rate.",
            'sum(job:resnet_images:rate5m{job="$job"})',
            "short",
        ),
        stat(
            "Fullest queue",
            "The fullest pod's queue, as a share of --max-queue-size (alert above 80% for "
            "5 minutes).",
            'max(job_pod:resnet_queue_utilization:ratio{job="$job"})',
            "percentunit",
            red_above(0.8),
        ),
        model_table,
        row("Traffic"),
        timeseries(
            "Requests by endpoint and status",
            "Answered requests per second. 429 = queue full, 503 = not ready or draining, "
            "504 = deadline, 4xx = bad requests.",
            targets(
                (
                    f"sum by (endpoint, status) (rate(resnet_requests_total{{{SEL}}}[{RATE}]))",
                    "{{endpoint}} {{status}}",
                )
            ),
            "reqps",
        ),
        timeseries(
            "Error ratio by endpoint",
            "Share of answers that were 5xx (server) and 4xx (client), per endpoint.",
            targets(
                (status_ratio("5.."), "5xx {{endpoint}}"),
                (status_ratio("4.."), "4xx {{endpoint}}"),
            ),
            "percentunit",
        ),
        timeseries(
            "Request latency p50 / p90 / p99",
            "Arrival to response inside the service, from the histogram summed over pods. "
            "With tracing on, exemplars (dots) link to the traces of slow requests.",
            [
                {**t, "exemplar": True}
                for t in quantiles("resnet_request_duration_seconds", "endpoint")
            ],
            "s",
        ),
        timeseries(
            "Images/s",
            "Images answered successfully per second, per endpoint.",
            targets(
                (
                    f"sum by (endpoint) (rate(resnet_images_total{{{SEL}}}[{RATE}]))",
                    "{{endpoint}}",
                )
            ),
            "short",
        ),
        timeseries(
            "Requests/s per pod",
            "How the load spreads over the pods, and requests in progress on each.",
            targets(
                (f"sum by (pod) (rate(resnet_requests_total{{{SEL}}}[{RATE}]))", "{{pod}} req/s"),
                (f"sum by (pod) (resnet_requests_in_progress{{{SEL}}})", "{{pod}} in progress"),
            ),
            "short",
        ),
        row("Queue and batching"),
        timeseries(
            "Queue depth vs capacity",
            "Images admitted and not yet on the engine, per pod, against --max-queue-size: "
            "beyond it requests get 429.",
            targets(
                (f"sum by (pod) (resnet_queue_depth{{{SEL}}})", "{{pod}} depth"),
                (f"max(resnet_queue_capacity{{{SEL}}})", "capacity"),
            ),
            "short",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "capacity"},
                    "properties": [
                        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                        {"id": "custom.fillOpacity", "value": 0},
                        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                    ],
                }
            ],
        ),
        timeseries(
            "Queue wait p50 / p99",
            "How long an image waited for its batch to start.",
            quantiles("resnet_queue_wait_seconds", qs=(0.5, 0.99)),
            "s",
        ),
        {
            "type": "bargauge",
            "title": "Batch-size distribution",
            "description": "Engine runs by batch size over the dashboard's time range (the "
            "bucket's upper bound). Mostly 1 under load means batching is not happening.",
            "datasource": DS,
            "targets": [
                target(
                    f"sum by (le) (increase(resnet_batch_size_bucket{{{SEL}}}[$__range]))",
                    "{{le}}",
                    instant=True,
                    format="heatmap",
                )
            ],
            "fieldConfig": {"defaults": {"unit": "short", "decimals": 0}, "overrides": []},
            "options": {
                "orientation": "vertical",
                "displayMode": "basic",
                "reduceOptions": {"calcs": ["lastNotNull"]},
            },
        },
        timeseries(
            "Batch size: mean and p90",
            "Images per engine run.",
            [
                target(
                    f"sum(rate(resnet_batch_size_sum{{{SEL}}}[{RATE}])) "
                    f"/ sum(rate(resnet_batch_size_count{{{SEL}}}[{RATE}]))",
                    "mean",
                    "A",
                ),
                *[{**t, "refId": "B"} for t in quantiles("resnet_batch_size", qs=(0.9,))],
            ],
            "short",
        ),
        timeseries(
            "Inference time per batch",
            "One engine run (a whole batch): p50, p99 and mean.",
            [
                *quantiles("resnet_inference_duration_seconds", qs=(0.5, 0.99)),
                target(
                    f"sum(rate(resnet_inference_duration_seconds_sum{{{SEL}}}[{RATE}])) "
                    f"/ sum(rate(resnet_inference_duration_seconds_count{{{SEL}}}[{RATE}]))",
                    "mean",
                    "C",
                ),
            ],
            "s",
        ),
        timeseries(
            "Batches/s by outcome",
            "Engine runs per second; any failed batch fails its requests with 500.",
            targets(
                (f"sum by (outcome) (rate(resnet_batches_total{{{SEL}}}[{RATE}]))", "{{outcome}}")
            ),
            "short",
        ),
        timeseries(
            "Decode time p50 / p99",
            "Decoding and resizing one image.",
            quantiles("resnet_decode_duration_seconds", qs=(0.5, 0.99)),
            "s",
        ),
        row("Refused and dropped work"),
        timeseries(
            "Rejections by reason",
            "Requests refused or failed: queue_full / too_busy (429), draining / not_ready "
            "(503), deadline (504), client_disconnected (499), body_timeout (408), "
            "unauthorized (401), bad_input (other 4xx), internal (500).",
            targets(
                (f"sum by (reason) (rate(resnet_rejections_total{{{SEL}}}[{RATE}]))", "{{reason}}")
            ),
            "reqps",
        ),
        timeseries(
            "Skipped images by reason",
            "Queued images dropped before inference because nobody waits for them: "
            "abandoned (client gone) or deadline (expired in the queue).",
            targets(
                (
                    f"sum by (reason) (rate(resnet_skipped_images_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                )
            ),
            "short",
        ),
        row("Model and GPU"),
        timeseries(
            "Model load and warm-up time",
            "Per pod: reading the package and creating the session, and the warm-up runs "
            "before readiness.",
            targets(
                (f"max by (pod) (resnet_model_load_seconds{{{SEL}}})", "{{pod}} load"),
                (f"max by (pod) (resnet_model_warmup_seconds{{{SEL}}})", "{{pod}} warm-up"),
            ),
            "s",
        ),
        timeseries(
            "GPU memory",
            "GPU memory in use and installed, per pod (GPU pods only; absent on CPUs).",
            targets(
                (f"max by (pod, gpu) (resnet_gpu_memory_used_bytes{{{SEL}}})", "{{pod}} used"),
                (f"max by (pod, gpu) (resnet_gpu_memory_total_bytes{{{SEL}}})", "{{pod}} total"),
            ),
            "bytes",
        ),
        timeseries(
            "GPU utilisation",
            "Fraction of time a kernel ran, per pod (GPU pods only; absent on CPUs).",
            targets(
                (
                    f"max by (pod, gpu) (resnet_gpu_utilization_ratio{{{SEL}}})",
                    "{{pod}} gpu {{gpu}}",
                )
            ),
            "percentunit",
        ),
    ]


def layout(items: list[Panel]) -> list[Panel]:
    """Rows and tables span the width; stats are 4 wide and 4 high; other panels go
    three to a line."""
    x = y = 0
    line_height = 0
    out = []
    for number, panel in enumerate(items, start=1):
        kind = panel["type"]
        if kind == "row":
            if x:
                y += line_height
            w, h = 24, 1
            x = 0
        elif kind == "stat":
            w, h = 4, 4
        elif kind == "table":
            w, h = 24, 5
        else:
            w, h = 8, 8
        if x + w > 24:
            x, y = 0, y + line_height
        panel = {"id": number, "gridPos": {"x": x, "y": y, "w": w, "h": h}, **panel}
        out.append(panel)
        line_height = h if x == 0 else max(line_height, h)
        x += w
        if x >= 24:
            x, y = 0, y + line_height
    return out


def dashboard() -> dict[str, Any]:
    variable_ds = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }
    job = {
        "name": "job",
        "label": "job",
        "type": "query",
        "datasource": DS,
        "query": {"query": "label_values(resnet_model_info, job)", "refId": "job"},
        "definition": "label_values(resnet_model_info, job)",
        "current": {"selected": True, "text": "resnet-serve", "value": "resnet-serve"},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "regex": "",
    }
    pod = {
        "name": "pod",
        "label": "pod",
        "type": "query",
        "datasource": DS,
        "query": {"query": 'label_values(resnet_model_info{job="$job"}, pod)', "refId": "pod"},
        "definition": 'label_values(resnet_model_info{job="$job"}, pod)',
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "regex": "",
    }
    return {
        "title": "resnet-serve",
        "uid": "resnet-serve",
        "description": "resnet-serve: traffic, latency, queue and batching, refusals, model "
        "and GPU. Needs the recording rules of deploy/prometheus/resnet-serve-rules.yaml for "
        "the Fleet row.",
        "tags": ["resnet-serve", "inference"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [variable_ds, job, pod]},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
