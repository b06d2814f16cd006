"""What the chart's objects need from a real cluster, and the value combinations that render
valid objects but could not work on one (refused at render time): probes and scrapes the
API keys would refuse, a double scrape, a NetworkPolicy that blocks the scrape, an export
that cannot reach its weights or builds the wrong variant, a PodDisruptionBudget that
protects nothing, GPU pods that never schedule or never scale. deploy/README.md lists what
each example needs, and is checked against what each example renders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.charts import (
    CHART,
    EXAMPLES,
    ROOT,
    env_of,
    find,
    load_values,
    notes,
    render,
    server_container,
    validate_objects,
)
from tests.deploy.test_deploy import parse_dockerfile

APPS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
OTHER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}


def pod_spec(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(documents, "Deployment")["spec"]["template"]["spec"]
    return spec


def kinds(documents: list[dict[str, Any]]) -> set[str]:
    return {document["kind"] for document in documents}


# ---------------------------------------------------------------- refused at render time


REFUSED = [
    pytest.param(
        {"config": {"apiKeyForProbes": True}}, "probes send no API key", id="keyed-probes"
    ),
    pytest.param(
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
        "scrape every pod twice",
        id="two-monitors",
    ),
    pytest.param(
        {"config": {"apiKeyForMetrics": True}},
        "metrics.podAnnotations",
        id="keyed-metrics-annotation-scrape",
    ),
    pytest.param(
        {
            "config": {"apiKeyForMetrics": True},
            "metrics": {"podAnnotations": False, "serviceMonitor": {"enabled": True}},
        },
        "metrics.authorization.existingSecret",
        id="keyed-metrics-monitor-without-a-key",
    ),
    pytest.param(
        {"networkPolicy": {"enabled": True, "ingressFrom": [APPS]}},
        "Prometheus could not scrape",
        id="policy-blocks-the-scrape",
    ),
    pytest.param(
        {"metrics": {"port": 8001}}, "metrics.port 8001 is grpc.port", id="metrics-on-grpc"
    ),
    pytest.param({"metrics": {"port": 8000}}, "is containerPorts.http", id="metrics-on-http"),
    pytest.param(
        {"grpc": {"port": 8000}}, "grpc.port 8000 is containerPorts.http", id="grpc-on-http"
    ),
    pytest.param(
        {"model": {"source": "export"}, "config": {"precision": "fp16"}},
        "would fall back to fp32",
        id="export-lacks-the-served-variant",
    ),
    pytest.param(
        {"model": {"source": "export", "export": {"precision": "int8"}}, "gpu": {"enabled": True}},
        "would fall back to fp32",
        id="export-int8-on-a-gpu",
    ),
]


@pytest.mark.parametrize(("values", "reason"), REFUSED)
def test_combinations_that_cannot_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], reason: str
) -> None:
    chart.validate_schema(values)  # each value alone is fine...
    with pytest.raises(helm.HelmError, match=re.escape(reason)):  # ...together they are not
        render(chart, values)


# ------------------------------------------------------------------- probes and scrapes


def test_keyed_metrics_are_scraped_with_a_key_or_on_their_own_port(chart: helm.Chart) -> None:
    """With config.apiKeyForMetrics the monitor sends `Authorization: Bearer` from a Secret
    (the header the service reads); on a separate metrics port no key is asked for."""
    for kind in ("serviceMonitor", "podMonitor"):
        values = {
            "config": {"apiKeyForMetrics": True},
            "metrics": {
                "podAnnotations": False,
                kind: {"enabled": True},
                "authorization": {"existingSecret": "scrape-key", "secretKey": "key"},
            },
        }
        documents = render(chart, values)
        validate_objects(documents)
        monitor = find(documents, kind[0].upper() + kind[1:])
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        (endpoint,) = endpoints
        assert endpoint["authorization"] == {
            "type": "Bearer",
            "credentials": {"name": "scrape-key", "key": "key"},
        }
        template = find(documents, "Deployment")["spec"]["template"]
        assert "prometheus.io/scrape" not in (template["metadata"]["annotations"] or {})
    separate = render(chart, {"config": {"apiKeyForMetrics": True}, "metrics": {"port": 9090}})
    assert env_of(server_container(separate))["RESNET_SERVE_METRICS_PORT"] == "9090"


def admits(policy: dict[str, Any], peer: dict[str, Any], port: str) -> bool:
    """Whether the NetworkPolicy lets `peer` (a NetworkPolicyPeer as written in the values)
    reach the named container port: a rule whose ports include it and whose `from` is
    absent (anyone) or lists the peer."""
    for rule in policy["spec"].get("ingress", []):
        ports = {item["port"] for item in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        if not rule.get("from") or peer in rule["from"]:
            return True
    return False


def test_network_policy_admits_the_scrape(chart: helm.Chart) -> None:
    """/metrics on the HTTP port: `metricsFrom` is admitted there beside `ingressFrom`.
    On its own port: the clients reach the HTTP port only, the scrapers the metrics port."""
    policy_values = {"enabled": True, "ingressFrom": [APPS], "metricsFrom": [MONITORING]}
    rendered = render(chart, {"networkPolicy": policy_values})
    validate_objects(rendered)
    shared = find(rendered, "NetworkPolicy")
    assert admits(shared, APPS, "http")
    assert admits(shared, MONITORING, "http")
    assert not admits(shared, OTHER, "http")
    separate_values = {"networkPolicy": policy_values, "metrics": {"port": 9090}}
    separate = find(render(chart, separate_values), "NetworkPolicy")
    assert admits(separate, MONITORING, "metrics")
    assert not admits(separate, MONITORING, "http")
    assert not admits(separate, APPS, "metrics")
    assert admits(separate, APPS, "grpc")
    anyone = find(render(chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert admits(anyone, OTHER, "http")  # no ingressFrom: the scrape is never blocked


# ---------------------------------------------------------------------- the export


def export_args(documents: list[dict[str, Any]]) -> list[str]:
    (init,) = pod_spec(documents)["initContainers"]
    assert init["command"] == ["resnet-export"]
    args: list[str] = init["args"]
    return args


def test_export_reads_weights_from_a_volume_without_network(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An air-gapped export: a Hugging Face checkpoint on a claim, mounted read-only in the
    init container only; no --arch (resnet-export refuses it beside --hf-dir). The rendered
    arguments go through resnet-export's own parser and checks, up to its loader."""
    from model_export import cli as export_cli

    values = {
        "model": {
            "source": "export",
            "export": {
                "sourceArgs": ["--hf-dir", "/weights/resnet-50"],
                "weightsVolume": {"persistentVolumeClaim": {"claimName": "resnet-weights"}},
            },
        }
    }
    documents = render(chart, values)
    validate_objects(documents)
    pod = pod_spec(documents)
    (init,) = pod["initContainers"]
    weights = {"name": "export-weights", "mountPath": "/weights", "readOnly": True}
    assert weights in init["volumeMounts"]
    volume = {"name": "export-weights", "persistentVolumeClaim": {"claimName": "resnet-weights"}}
    assert volume in pod["volumes"]
    assert all(m["name"] != "export-weights" for m in server_container(documents)["volumeMounts"])
    args = export_cli.build_parser().parse_args(export_args(documents))
    loaded: list[Path] = []

    def load_huggingface(directory: Path, num_classes: int | None) -> object:
        loaded.append(directory)
        return object()

    monkeypatch.setattr(export_cli.sources, "load_huggingface", load_huggingface)
    export_cli.load_model(args, export_cli.Progress(quiet=True))
    assert loaded == [Path("/weights/resnet-50")]
    assert Path(weights["mountPath"]) in loaded[0].parents
    # --weights keeps its --arch; an empty arch is not passed at all.
    assert export_args(render(chart, {"model": {"source": "export"}}))[:2] == ["--arch", "resnet50"]
    mmpretrain = {
        "source": "export",
        "export": {"arch": "", "sourceArgs": ["--mmpretrain-checkpoint", "/weights/v1d50.pth"]},
    }
    assert "--arch" not in export_args(render(chart, {"model": mmpretrain}))


def test_export_builds_the_variant_the_image_serves(chart: helm.Chart) -> None:
    """Without a precision set, the init container builds what the image serves by default
    (the Dockerfile's RESNET_SERVE_PRECISION): INT8 for the CPU image, FP16 for the GPU's."""
    stages = parse_dockerfile()
    for gpu, target in [(False, "cpu"), (True, "gpu")]:
        documents = render(chart, {"model": {"source": "export"}, "gpu": {"enabled": gpu}})
        args = export_args(documents)
        built = args[args.index("--precision") + 1]
        assert built == stages[target].env["RESNET_SERVE_PRECISION"], target
        values = {"model": {"source": "export"}, "gpu": {"enabled": gpu}}
        assert f"fp32 and {built})" in notes(chart, values)
        assert "RESNET_SERVE_PRECISION" not in env_of(server_container(documents))
    fp32 = {
        "model": {"source": "export", "export": {"precision": "fp32"}},
        "config": {"precision": "fp32"},
    }
    assert "--precision" not in export_args(render(chart, fp32))


# ----------------------------------------------------------- scheduling and disruption


def test_pod_disruption_budget_only_where_it_protects(chart: helm.Chart) -> None:
    assert "PodDisruptionBudget" not in kinds(render(chart))  # one replica
    assert "No PodDisruptionBudget" in notes(chart)  # and NOTES.txt says why
    three = find(render(chart, {"replicaCount": 3}), "PodDisruptionBudget")
    assert three["spec"]["maxUnavailable"] == 1
    assert "No PodDisruptionBudget" not in notes(chart, {"replicaCount": 3})
    scaled = render(chart, {"autoscaling": {"enabled": True, "maxReplicas": 4}})
    assert find(scaled, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    single = {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}}
    assert "PodDisruptionBudget" not in kinds(render(chart, single))
    assert "PodDisruptionBudget" not in kinds(
        render(chart, {"replicaCount": 3, "podDisruptionBudget": {"enabled": False}})
    )


def test_gpu_example_schedules_with_the_device_plugin_alone(chart: helm.Chart) -> None:
    """The device plugin advertises `nvidia.com/gpu` but labels no node; the `nvidia.com/*`
    node labels (gpu.present, gpu.product, ...) come from GPU Feature Discovery, which only
    the GPU Operator installs. The GPU limit alone picks the nodes."""
    documents = render(chart, load_values(CHART / "examples" / "gpu-values.yaml"))
    pod = pod_spec(documents)
    assert server_container(documents)["resources"]["limits"]["nvidia.com/gpu"] == 1
    selected = set(pod.get("nodeSelector", {}))
    affinity = str(pod.get("affinity", {}))
    assert not {key for key in selected if key.startswith("nvidia.com/")}, selected
    assert "nvidia.com/" not in affinity
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_examples_that_scale_on_the_queue_get_their_pods_scraped(chart: helm.Chart) -> None:
    """The HPA's queue metric comes from prometheus-adapter, which reads Prometheus: an
    example with that HPA must make the Prometheus Operator scrape its pods."""
    checked = []
    for path in EXAMPLES:
        documents = render(chart, load_values(path))
        if "HorizontalPodAutoscaler" not in kinds(documents):
            continue
        hpa = find(documents, "HorizontalPodAutoscaler")
        if any(metric["type"] == "Pods" for metric in hpa["spec"]["metrics"]):
            assert kinds(documents) & {"ServiceMonitor", "PodMonitor"}, path.name
            checked.append(path.name)
    assert {"gpu-values.yaml", "autoscaling-hpa-values.yaml"} <= set(checked)


# ------------------------------------------------------- what each example needs, documented


def cluster_needs(documents: list[dict[str, Any]]) -> set[str]:
    """What the rendered objects need installed in the cluster, in the words deploy/README
    must use for them."""
    found = kinds(documents)
    needs = set()
    if found & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}:
        needs.add("Prometheus Operator")
    if "HorizontalPodAutoscaler" in found:
        metrics = find(documents, "HorizontalPodAutoscaler")["spec"]["metrics"]
        if any(metric["type"] == "Pods" for metric in metrics):
            needs.add("prometheus-adapter")
        if any(metric["type"] == "Resource" for metric in metrics):
            needs.add("metrics-server")
    if "ScaledObject" in found:
        needs.add("KEDA")
    if "Ingress" in found:
        needs.add("ingress controller")
    if "NetworkPolicy" in found:
        needs.add("enforces NetworkPolicy")
    if "ConfigMap" in found:
        needs.add("Grafana")
    pod = pod_spec(documents)
    limits = server_container(documents)["resources"].get("limits", {})
    if any(name.startswith("nvidia.com/") for name in limits):
        needs.add("NVIDIA device plugin")
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            needs.add("PersistentVolumeClaim")
        if "secret" in volume:
            needs.add("Secret")
    for init in pod.get("initContainers", []):
        if "--weights" in init["args"]:
            needs.add("egress")
    return needs


def readme_needs() -> dict[str, str]:
    """The rows of deploy/README.md's table "What each example needs from the cluster"."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text.split("### What each example needs from the cluster", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| \[`([\w.-]+\.yaml)`\]\([^)]+\) \| (.+) \|$", section, re.MULTILINE)
    return dict(rows)


def test_deploy_readme_says_what_each_example_needs(chart: helm.Chart) -> None:
    documented = readme_needs()
    assert set(documented) == {path.name for path in EXAMPLES}
    for path in EXAMPLES:
        needs = cluster_needs(render(chart, load_values(path)))
        missing = [need for need in needs if need.lower() not in documented[path.name].lower()]
        assert not missing, f"deploy/README.md: {path.name} needs {missing}"
    readme = (ROOT / "deploy" / "README.md").read_text()  # and every example link resolves
    for link in re.findall(r"\]\((\.\./helm/resnet-serve/examples/[\w.-]+)\)", readme):
        assert (ROOT / "deploy" / link).resolve().is_file(), link
