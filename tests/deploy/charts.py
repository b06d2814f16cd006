"""The chart as the deployment tests see it: rendered by Helm's own engine
(helm-python-sdk) and read back as objects."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "resnet-serve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRDS = yaml.safe_load((Path(__file__).parent / "crd_subsets.yaml").read_text())
# The oldest Kubernetes the chart documents (Chart.yaml kubeVersion) and the target.
KUBE_VERSIONS = ("1.29.0", "1.33.0")


def loaded_chart() -> Iterator[helm.Chart]:
    """The chart, loaded once for the tests that render it (the `chart` fixture)."""
    helm.disable_logging()
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifests = chart.render(values or {}, name="demo", namespace="ml", is_install=True)
    return [
        document
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    """NOTES.txt as `helm install` prints it."""
    manifests = chart.render(values or {}, name="demo", namespace="ml", is_install=True)
    (text,) = [text for path, text in manifests.items() if path.endswith("NOTES.txt")]
    return text


def load_values(path: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(path.read_text())
    return values


def find(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [document for document in documents if document["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} {kind} objects"
    return matches[0]


def server_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "server"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's own parser on the chart's environment (names it lacks yet skipped)."""
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            field = name.removeprefix(ENV_PREFIX).lower()
            if field in Settings.model_fields:
                monkeypatch.setenv(name, value)
    return Settings()


def validate_objects(documents: list[dict[str, Any]]) -> None:
    """Built-in objects with kubernetes-validate --strict for each Kubernetes version,
    custom resources against their CRDs' fields (crd_subsets.yaml)."""
    for document in documents:
        if document["kind"] in CRDS:
            crd = CRDS[document["kind"]]
            assert document["apiVersion"] == crd["apiVersion"]
            jsonschema.validate(document, crd["schema"])
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
