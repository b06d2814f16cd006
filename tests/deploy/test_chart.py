"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk binds Helm's Go
SDK: no helm binary, no cluster), every built-in object validated with kubernetes-validate
--strict against the oldest Kubernetes the chart supports and 1.33, custom resources
against their CRDs' fields (tests/deploy/crd_subsets.yaml), and the chart held to the service's
own settings, routes and metrics."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.channel.arena import shm_needed
from service.config import ENV_PREFIX, Settings
from service.cpus import CpuLimit, auto_workers
from service.frontend.app import create_app
from service.observability.metrics import ServiceMetrics
from tests.deploy.charts import (
    CHART,
    CRDS,
    EXAMPLES,
    KUBE_VERSIONS,
    ROOT,
    env_of,
    find,
    load_values,
    render,
    server_container,
    settings_from_env,
    validate_objects,
)

# Settings the chart sets from its own values rather than from `config:`.
CHART_MANAGED = {
    "host": "always 0.0.0.0",
    "port": "containerPorts.http",
    "model_dir": "model.*",
    "metrics_port": "metrics.port",
    "grpc_port": "grpc.*",
    "api_keys_file": "apiKeys.*",
    "api_keys": "apiKeys.* (as a mounted file, RESNET_SERVE_API_KEYS_FILE)",
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() if part != "s" else "S" for part in rest)


# --------------------------------------------------------------------------- render, lint


CASES = [pytest.param(None, id="defaults")] + [pytest.param(p, id=p.stem) for p in EXAMPLES]


@pytest.mark.parametrize("values_file", CASES)
def test_helm_lint_strict_is_clean(values_file: Path | None) -> None:
    values = load_values(values_file) if values_file else None
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace="ml", kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warning or error
        assert not report["errors"], report
        assert not problems, report


def test_helm_lint_reports_problems() -> None:
    report = helm.lint(CHART, {"replicaCount": "three"}, strict=True, namespace="ml")
    assert report["errors"]
    assert any("replicaCount" in m["error"] for m in report["messages"] if m["severity"] == 3)


@pytest.mark.parametrize("values_file", CASES)
def test_rendered_objects_validate_against_kubernetes_and_crd_schemas(
    chart: helm.Chart, values_file: Path | None
) -> None:
    documents = render(chart, load_values(values_file) if values_file else None)
    assert {"Deployment", "Service", "ServiceAccount"} <= {d["kind"] for d in documents}
    validate_objects(documents)


def test_validation_catches_what_it_should(chart: helm.Chart) -> None:
    """The validators above can fail: a misspelt field in a built-in and a custom object."""
    documents = render(chart, load_values(CHART / "examples" / "monitoring-values.yaml"))
    deployment = find(documents, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    monitor = find(documents, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["scrape_interval"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRDS["ServiceMonitor"]["schema"])


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "three"},
        {"config": {"precision": "int4"}},
        {"config": {"maxBatchSise": 8}},  # a misspelt setting
        {"config": {"maxBatchSize": 0}},
        {"config": {"shutdownGraceS": None}},
        {"gpu": {"count": "one"}},
        {"model": {"source": "s3"}},
        {"model": {"source": "pvc"}},  # without a claim
        {"autoscaling": {"enabled": True, "engine": "keda"}},  # without a Prometheus URL
        {"autoscaling": {"queue": {"signal": "latency"}}},
        {"image": {"pullPolicy": "Sometimes"}},
    ],
)
def test_schema_refuses_bad_values(chart: helm.Chart, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmError):
        chart.render(bad, name="demo", namespace="ml", is_install=True)


def test_every_example_passes_the_schema(chart: helm.Chart) -> None:
    for path in EXAMPLES:
        chart.validate_schema(load_values(path))


# ------------------------------------------------------------------ chart <-> the service


def test_every_setting_has_a_chart_value() -> None:
    """Derived from Settings, so a setting added later without a chart value fails here."""
    values = load_values(CHART / "values.yaml")
    schema = (CHART / "values.schema.json").read_text()
    config_schema = yaml.safe_load(schema)["properties"]["config"]["properties"]
    missing = [
        name
        for name in Settings.model_fields
        if name not in CHART_MANAGED and camel(name) not in values["config"]
    ]
    assert not missing, f"settings without a line under config: in values.yaml: {missing}"
    unknown = [key for key in values["config"] if key not in map(camel, Settings.model_fields)]
    assert not unknown, f"config keys that are not settings: {unknown}"
    assert set(config_schema) == set(values["config"]), "values.schema.json config != values"


def test_schema_choices_match_the_settings() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())["properties"]["config"]
    precision = Settings.model_fields["precision"].annotation
    assert precision is not None
    assert set(schema["properties"]["precision"]["enum"]) - {None} == {p.value for p in precision}
    runtimes = set(get_args(Settings.model_fields["runtime"].annotation))
    assert set(schema["properties"]["runtime"]["enum"]) - {None} == runtimes
    log_levels = set(schema["properties"]["logLevel"]["enum"]) - {None}
    assert log_levels == {"debug", "info", "warning", "error"}
    Settings(log_level="warning")  # the service takes the same names


def full_config() -> dict[str, Any]:
    """Every `config:` key set, to the service's default value."""
    config: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        if name in CHART_MANAGED:
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:  # automatic: pick a value of the setting's own type
            kinds = get_args(field.annotation)
            default = True if bool in kinds else 3 if int in kinds else default
        if isinstance(default, list) and not default:
            default = [1, 2, 4]
        config[camel(name)] = getattr(default, "value", default)
    config["maxBodyBytes"] = 67_108_864  # a YAML float64 in templates: must not print 6.7e+07
    config["maxQueueDelayMs"] = 2.5
    config["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    config["openvinoCacheDir"] = "/tmp/openvino-cache"
    return config


def test_every_config_value_reaches_the_service_parser(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = full_config()
    env = env_of(server_container(render(chart, {"config": config})))
    settings = settings_from_env(env, monkeypatch)
    for key, value in config.items():
        name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()
        assert ENV_PREFIX + name.upper() in env, f"config.{key} set no {ENV_PREFIX}{name.upper()}"
        got = getattr(settings, name)
        got = str(got) if isinstance(got, Path) else getattr(got, "value", got)
        assert got == value, f"{key}: {got!r} != {value!r}"
    assert settings.host == "0.0.0.0"
    assert env["RESNET_SERVE_MAX_BODY_BYTES"] == "67108864"


@pytest.mark.parametrize("values_file", CASES)
def test_chart_env_names_are_settings_and_parse(
    chart: helm.Chart, values_file: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = server_container(render(chart, load_values(values_file) if values_file else None))
    env = env_of(container)
    names = {name.removeprefix(ENV_PREFIX).lower() for name in env if name.startswith(ENV_PREFIX)}
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
    settings = settings_from_env(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert settings.port == http
    assert str(settings.model_dir).startswith("/models/")


def test_probes_use_the_service_routes_and_port(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = server_container(render(chart))
    app = create_app(Settings(model_dir=Path("/nonexistent")))
    routes = set(app.openapi()["paths"])  # every route the service documents
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == "http"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings_from_env(env_of(container), monkeypatch).port == ports["http"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize(("grace", "sleep", "extra"), [(30, 5, 5), (12.5, 7, 3), (0, 0, 1)])
def test_drain_timing_follows_the_service_setting(
    chart: helm.Chart,
    monkeypatch: pytest.MonkeyPatch,
    grace: float,
    sleep: int,
    extra: int,
) -> None:
    values = {
        "config": {"shutdownGraceS": grace},
        "drain": {"preStopSleepSeconds": sleep, "extraSeconds": extra},
    }
    documents = render(chart, values)
    pod = find(documents, "Deployment")["spec"]["template"]["spec"]
    container = server_container(documents)
    settings = settings_from_env(env_of(container), monkeypatch)
    assert settings.shutdown_grace_s == grace
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
    assert pod["terminationGracePeriodSeconds"] == sleep + math.ceil(grace) + extra
    assert pod["terminationGracePeriodSeconds"] > sleep + settings.shutdown_grace_s


# ------------------------------------------------------------------------ chart features


def test_defaults_are_secure_and_bounded(chart: helm.Chart) -> None:
    documents = render(chart)
    pod = find(documents, "Deployment")["spec"]["template"]["spec"]
    container = server_container(documents)
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # Service env vars share the RESNET_SERVE_ prefix
    assert find(documents, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["cpu"]
        assert container["resources"][kind]["memory"]
    env = env_of(container)
    assert not {"RESNET_SERVE_INTRA_OP_THREADS", "RESNET_SERVE_DECODE_WORKERS"} & set(env)
    assert container["image"].endswith(":0.1.0-cpu")
    # One replica: no PodDisruptionBudget, which could only let a drain take the pod, or
    # block the drain (test_chart_cluster.py has the cases that get one).
    assert "PodDisruptionBudget" not in {d["kind"] for d in documents}
    spread = pod["topologySpreadConstraints"][0]
    assert (
        spread["labelSelector"]["matchLabels"]
        == find(documents, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_gpu_values_request_a_gpu_and_the_gpu_image(chart: helm.Chart) -> None:
    documents = render(chart, load_values(CHART / "examples" / "gpu-values.yaml"))
    container = server_container(documents)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-gpu")
    assert env_of(container)["RESNET_SERVE_PRECISION"] == "fp16"
    hpa = find(documents, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]  # no CPU metric on GPUs
    mig = render(chart, {"gpu": {"enabled": True, "resourceName": "nvidia.com/mig-1g.10gb"}})
    limits = server_container(mig)["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == 1
    assert "nvidia.com/gpu" not in limits


def test_model_sources(chart: helm.Chart) -> None:
    pvc = render(chart, load_values(CHART / "examples" / "pvc-values.yaml"))
    pod = find(pvc, "Deployment")["spec"]["template"]["spec"]
    claim = {"claimName": "resnet-models", "readOnly": True}
    assert {"name": "models", "persistentVolumeClaim": claim} in pod["volumes"]
    assert env_of(server_container(pvc))["RESNET_SERVE_MODEL_DIR"] == "/models/packages/resnet50"
    export = render(chart, load_values(CHART / "examples" / "export-values.yaml"))
    pod = find(export, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"].endswith(":0.1.0-export")
    out = init["args"][init["args"].index("--out") + 1]
    assert out == env_of(server_container(export))["RESNET_SERVE_MODEL_DIR"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


# resnet-export's peak RSS for ResNet-50 FP32 + INT8 (random init, default calibration),
# measured with /usr/bin/time -v (docs/model-package.md#export-memory).
RESNET50_INT8_EXPORT_PEAK_BYTES = 2_198_656 * 1024


def test_export_init_container_fits_the_measured_export(chart: helm.Chart) -> None:
    export = render(chart, load_values(CHART / "examples" / "export-values.yaml"))
    (init,) = find(export, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert "int8" in init["args"]
    resources = init["resources"]
    request = int(resources["requests"]["memory"].removesuffix("Gi")) * 2**30
    limit = int(resources["limits"]["memory"].removesuffix("Gi")) * 2**30
    # The request covers the measured peak; the limit leaves a third more for other weights
    # and ONNX Runtime's per-thread buffers on larger nodes.
    assert request >= RESNET50_INT8_EXPORT_PEAK_BYTES
    assert limit >= 1.33 * RESNET50_INT8_EXPORT_PEAK_BYTES
    assert limit <= 2 * request  # not sized for the old 9 GB calibration


def service_metric_names() -> set[str]:
    names = set()
    for family in ServiceMetrics().registry.collect():
        names |= {sample.name for sample in family.samples}
        names.add(family.name)
    return names


def promql_metrics(expression: str) -> set[str]:
    return set(re.findall(r"\b(resnet_[a-z_]+)\b", expression))


def test_autoscaling_uses_metrics_the_service_exports(chart: helm.Chart) -> None:
    exported = service_metric_names()
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    adapter_metrics = {}
    for rule in adapter["rules"]["custom"]:
        assert promql_metrics(rule["metricsQuery"] + rule["seriesQuery"]) <= exported
        adapter_metrics[rule["name"]["as"]] = rule
    for signal in ("fill", "waitP90"):
        values = {"autoscaling": {"enabled": True, "queue": {"signal": signal}}}
        hpa = find(render(chart, values), "HorizontalPodAutoscaler")
        (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods["metric"]["name"] in adapter_metrics
        assert pods["target"] == {"type": "AverageValue", "averageValue": "0.1"}
        keda_values = {
            "autoscaling": {
                "enabled": True,
                "engine": "keda",
                "queue": {"signal": signal},
                "keda": {"serverAddress": "http://prometheus:9090"},
            }
        }
        documents = render(chart, keda_values)
        assert not [d for d in documents if d["kind"] == "HorizontalPodAutoscaler"]
        scaled = find(documents, "ScaledObject")
        prometheus = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
        assert promql_metrics(prometheus[0]["metadata"]["query"]) <= exported
        assert 'namespace="ml"' in prometheus[0]["metadata"]["query"]
        assert [t["type"] for t in scaled["spec"]["triggers"]] == ["prometheus", "cpu"]


def test_monitoring_objects_embed_the_deploy_files(chart: helm.Chart) -> None:
    for link, target in [
        ("dashboard.json", ROOT / "deploy" / "grafana" / "resnet-serve-dashboard.json"),
        ("rules.yaml", ROOT / "deploy" / "prometheus" / "resnet-serve-rules.yaml"),
    ]:
        path = CHART / "files" / link
        assert path.is_symlink()
        assert path.resolve() == target.resolve()
    documents = render(chart, load_values(CHART / "examples" / "monitoring-values.yaml"))
    dashboard = find(documents, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "deploy" / "grafana" / "resnet-serve-dashboard.json").read_text()
    assert dashboard["data"]["resnet-serve.json"] == text.rstrip("\n")
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "resnet-serve-rules.yaml").read_text())
    assert find(documents, "PrometheusRule")["spec"] == rules
    monitor = find(documents, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The job label is the same as in the compose stack's scrape config.
    compose_prometheus = ROOT / "deploy" / "compose" / "prometheus.yaml"
    (job,) = yaml.safe_load(compose_prometheus.read_text())["scrape_configs"]
    pod_monitored = load_values(CHART / "examples" / "monitoring-values.yaml")
    pod_monitored["metrics"] |= {
        "serviceMonitor": {"enabled": False},
        "podMonitor": {"enabled": True},
    }
    for kind, rendered in [
        ("ServiceMonitor", documents),
        ("PodMonitor", render(chart, pod_monitored)),
    ]:
        label = find(rendered, kind)["spec"]["jobLabel"]
        assert find(rendered, "Service")["metadata"]["labels"][label] == job["job_name"]
    service_ports = {p["name"] for p in find(documents, "Service")["spec"]["ports"]}
    assert service_ports == {"http", "grpc", "metrics"}
    env = env_of(server_container(documents))
    assert env["RESNET_SERVE_METRICS_PORT"] == "9090"
    assert env["RESNET_SERVE_API_KEYS_FILE"] == "/etc/resnet-serve/api-keys/api-keys"
    policy = find(documents, "NetworkPolicy")
    assert policy["spec"]["egress"] == []


def test_grpc_port_is_on_by_default_and_can_be_turned_off(chart: helm.Chart) -> None:
    default = render(chart)
    assert env_of(server_container(default))["RESNET_SERVE_GRPC_PORT"] == "8001"
    service_ports = {p["name"]: p for p in find(default, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 8001
    assert service_ports["grpc"]["appProtocol"] == "grpc"
    container_ports = {p["name"]: p for p in server_container(default)["ports"]}
    assert container_ports["grpc"]["containerPort"] == 8001
    off = render(chart, load_values(CHART / "examples" / "grpc-values.yaml"))
    assert "RESNET_SERVE_GRPC_PORT" not in env_of(server_container(off))
    assert [p["name"] for p in find(off, "Service")["spec"]["ports"]] == ["http"]


def test_chart_readme_lists_every_value() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))

    def leaves(node: Any, prefix: str = "") -> Iterator[str]:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix.rstrip(".")

    for leaf in leaves(load_values(CHART / "values.yaml")):
        parts = leaf.split(".")
        prefixes = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        assert prefixes & documented, f"{leaf} is not documented in the chart README"


def test_packaged_chart_carries_the_linked_files(tmp_path: Path) -> None:
    """`helm package` follows files/*'s symlinks: the archive holds the deploy/ files."""
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        files = {item["name"]: item["data"] for item in packaged.files}
    for name, source in [
        ("files/dashboard.json", ROOT / "deploy" / "grafana" / "resnet-serve-dashboard.json"),
        ("files/rules.yaml", ROOT / "deploy" / "prometheus" / "resnet-serve-rules.yaml"),
    ]:
        assert files[name] == source.read_text()


def test_kubernetes_validate_command_line_on_the_gpu_render(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """The same check through the `kubernetes-validate --strict` command, on a manifest file."""
    documents = render(chart, load_values(CHART / "examples" / "gpu-values.yaml"))
    built_in = [d for d in documents if d["kind"] not in CRDS]
    manifest = tmp_path / "gpu.yaml"
    manifest.write_text(yaml.safe_dump_all(built_in))
    command = str(Path(sys.executable).parent / "kubernetes-validate")
    for version in KUBE_VERSIONS:
        result = subprocess.run(
            [command, "--strict", "--kubernetes-version", version, str(manifest)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    built_in[0].setdefault("spec", {})["replicaz"] = 1
    manifest.write_text(yaml.safe_dump_all(built_in))
    result = subprocess.run(
        [command, "--strict", "--kubernetes-version", KUBE_VERSIONS[1], str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"workers": 3},
        {"workers": 2, "maxQueueSize": 1024, "maxBatchSize": 32},
        {"maxBufferedBytes": 64 * 2**20, "maxBodyBytes": 8 * 2**20},
    ],
)
def test_dev_shm_is_memory_sized_as_the_server_checks(
    chart: helm.Chart, config: dict[str, int]
) -> None:
    """The chart's /dev/shm holds what the server needs (service/channel/arena.py), with
    no more than 2 MiB to spare; an explicit sizeLimit wins."""
    documents = render(chart, {"config": config})
    pod = find(documents, "Deployment")["spec"]["template"]["spec"]
    (shm,) = [volume for volume in pod["volumes"] if volume["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {
        mount["name"]: mount["mountPath"] for mount in server_container(documents)["volumeMounts"]
    }
    assert mounts["shm"] == "/dev/shm"
    limit = int(shm["emptyDir"]["sizeLimit"].removesuffix("Mi")) * 2**20
    snake = {camel(name): name for name in Settings.model_fields}
    settings = Settings(**{snake[key]: value for key, value in config.items()})
    workers = config.get("workers", auto_workers(CpuLimit(2.0, "chart", 2.0)))  # limits.cpu 2
    _arena, needed = shm_needed(settings, workers, 224 * 224 * 3, 4 * (1000 + 2048))
    assert needed <= limit <= needed + 2 * 2**20
    explicit = render(chart, {"shm": {"sizeLimit": "3Gi"}})
    pod = find(explicit, "Deployment")["spec"]["template"]["spec"]
    (shm,) = [volume for volume in pod["volumes"] if volume["name"] == "shm"]
    assert shm["emptyDir"]["sizeLimit"] == "3Gi"
