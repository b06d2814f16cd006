"""The container image recipe, the local compose stack, the KServe examples and the offline
API docs, checked with what runs here (no container engine, no cluster): hadolint on the
Dockerfile, and the service's own settings parser on every command line and environment
the deployment files give it."""

from __future__ import annotations

import fnmatch
import http.server
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loadtests.cheap_package import write_cheap_package
from service import healthcheck
from service.cli import build_parser
from service.config import ENV_PREFIX, Settings
from service.frontend.app import create_app
from tests.support import running_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = yaml.safe_load((Path(__file__).parent / "crd_subsets.yaml").read_text())
KUBE_VERSIONS = ("1.29.0", "1.33.0")


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def json_instruction(self, name: str) -> list[str]:
        (text,) = [rest for instruction, rest in self.instructions if instruction == name]
        value: list[str] = json.loads(text)
        return value


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> dict[str, Stage]:
    """Stages by name, with their ARG defaults, ENV and instructions (enough for checks)."""
    logical: list[str] = []
    buffer = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buffer += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(buffer.strip())
            buffer = ""
    stages: dict[str, Stage] = {}
    global_args: dict[str, str] = {}
    stage: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            base = substitute(words[0], global_args)
            stage = Stage(name=words[2].lower(), base=base)
            stages[stage.name] = stage
            continue
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            (stage.args if stage else global_args)[name] = default
        elif instruction == "ENV" and stage is not None:
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                stage.env[name] = substitute(value, stage.args)
        if stage is not None:
            stage.instructions.append((instruction, rest))
    return stages


def hadolint() -> str:
    return str(Path(sys.executable).parent / "hadolint")


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile() -> None:
    bad = "FROM python:latest\nRUN pip install requests\nUSER root\n"
    result = subprocess.run(
        [hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "-"],
        input=bad,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_command_and_environment_are_accepted_by_the_service(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = parse_dockerfile()
    stage = stages[target]
    entrypoint = stage.json_instruction("ENTRYPOINT")
    assert entrypoint[:2] == ["/usr/bin/tini", "--"], "tini forwards SIGTERM: the drain runs"
    assert entrypoint[2] == "resnet-serve"
    commands = [rest for instruction, rest in stage.instructions if instruction == "CMD"]
    argv = entrypoint[3:] + (json.loads(commands[0]) if commands else [])
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in stage.env.items():
        if name.startswith(ENV_PREFIX):
            assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name
            monkeypatch.setenv(name, value)
    settings = Settings(**vars(build_parser().parse_args(argv)))
    assert settings.host == "0.0.0.0"
    exposed = [rest for instruction, rest in stage.instructions if instruction == "EXPOSE"]
    assert exposed == [str(settings.port)]
    # The package the model stage bakes in is where the server looks for it.
    export_run = " ".join(rest for i, rest in stages["model-export"].instructions if i == "RUN")
    out = re.search(r'--out "([^"]+)"', export_run)
    assert out is not None
    assert Path(substitute(out[1], stages["model-export"].args)) == settings.model_dir
    assert ["USER", "10001:10001"] in [[i, rest] for i, rest in stage.instructions]
    healthcheck_cmd = next(rest for i, rest in stage.instructions if i == "HEALTHCHECK")
    assert '"-m", "service.healthcheck"' in healthcheck_cmd


def test_final_images_hold_no_torch_and_no_build_tools() -> None:
    stages = parse_dockerfile()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for target, build in [("cpu", "build-cpu"), ("gpu", "build-gpu")]:
        copies = [rest for i, rest in stages[target].instructions if i == "COPY"]
        sources = set(re.findall(r"--from=(\S+)", " ".join(copies)))
        assert sources == {build, "model"}, sources
        (install,) = [rest for i, rest in stages[build].instructions if i == "RUN"]
        assert "-c constraints.txt" in install, "dependencies from the lock file"
        # The chart serves gRPC by default; OTEL_* variables switch traces on (deploy/README).
        assert f'".[{target},grpc,tracing]"' in install
        final = " ".join(rest for i, rest in stages[target].instructions if i == "RUN")
        assert not re.search(r"\b(gcc|g\+\+|build-essential|pip install)\b", final)
        assert stages[build].base.startswith(("python-base", "cuda-base"))
    extras = tomllib.loads(pyproject)["project"]["optional-dependencies"]
    for name in ("cpu", "gpu", "grpc", "tracing"):
        names = {canonicalize_name(r.name) for r in extra_requirements(extras, name)}
        assert not {"torch", "torchvision"} & names, name
        assert "grpcio-tools" not in names  # a dev tool: the stubs are committed
    cuda = stages["cuda-base"].base
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", cuda), cuda
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", stages["python-base"].base)


ONNX_RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def extra_requirements(extras: dict[str, list[str]], extra: str) -> list[Requirement]:
    """What installing `.[extra]` pulls, following the project's references to itself
    (`resnet-serve[eval]`)."""
    found: list[Requirement] = []
    for line in extras[extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "resnet-serve":
            for inner in requirement.extras:
                found += extra_requirements(extras, inner)
        else:
            found.append(requirement)
    return found


def test_one_onnx_runtime_per_install() -> None:
    """Only `cpu` pulls onnxruntime and only `gpu` onnxruntime-gpu (pinned to the minor
    built for the image's CUDA major), so `.[gpu,export]` holds one ONNX Runtime; and every
    install the project runs names exactly one of the two."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def runtimes(requirements: list[Requirement]) -> set[str]:
        return {canonicalize_name(r.name) for r in requirements} & ONNX_RUNTIMES

    assert runtimes([Requirement(line) for line in project["dependencies"]]) == set()
    found = {extra: runtimes(extra_requirements(extras, extra)) for extra in extras}
    assert found.pop("cpu") == {"onnxruntime"}
    assert found.pop("gpu") == {"onnxruntime-gpu"}
    assert not any(found.values()), found
    (gpu_runtime,) = [r for r in extra_requirements(extras, "gpu") if r.name == "onnxruntime-gpu"]
    assert "1.31.1" in gpu_runtime.specifier
    assert "1.32.0" not in gpu_runtime.specifier, "a new minor may change the CUDA major"
    locked = re.search(r"^onnxruntime-gpu==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert locked is not None
    assert locked[1] in gpu_runtime.specifier
    installs = re.findall(r'"\.\[([a-z,]+)\]"', (ROOT / "Dockerfile").read_text())
    installs += re.findall(
        r'extras="\$\{1:-([a-z,]+)\}"', (ROOT / "scripts" / "setup.sh").read_text()
    )
    installs += re.findall(r"setup\.sh ([a-z,]+)", (ROOT / "scripts" / "serve.sh").read_text())
    assert len(installs) >= 5, installs
    for install in installs:
        assert len({"cpu", "gpu"} & set(install.split(","))) == 1, install


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_every_copied_file_is_in_the_build_context() -> None:
    for stage in parse_dockerfile().values():
        for instruction, rest in stage.instructions:
            if instruction != "COPY" or "--from=" in rest:
                continue
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert dockerignore_allows(source.rstrip("/")), f"{source} is in .dockerignore"
                if (ROOT / source).is_dir():
                    assert dockerignore_allows(f"{source.rstrip('/')}/cli.py")
    assert not dockerignore_allows(".venv")
    assert not dockerignore_allows("models")
    assert not dockerignore_allows(".git")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_image_healthcheck_follows_the_port_setting(
    health_server: tuple[http.server.HTTPServer, type[_Health]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, handler = health_server
    port = server.server_address[1]
    monkeypatch.setenv("RESNET_SERVE_PORT", str(port))
    assert healthcheck.main() == 0
    handler.status = 503
    assert healthcheck.main() == 1
    server.shutdown()
    server.server_close()
    assert healthcheck.check(port, timeout_s=1) is False  # nothing listening


@pytest.mark.parametrize("keys_from", ["env", "file"])
def test_image_healthcheck_sends_a_key_when_probes_need_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys_from: str
) -> None:
    """RESNET_SERVE_API_KEY_FOR_PROBES: the real server answers /healthz 401 without a key,
    and the image's HEALTHCHECK, reading the same settings, gets in with one of its keys."""
    package = write_cheap_package(tmp_path / "cheap")
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RESNET_SERVE_API_KEY_FOR_PROBES", "true")
    if keys_from == "env":
        monkeypatch.setenv("RESNET_SERVE_API_KEYS", "probe-key-1,probe-key-2")
    else:
        keys = tmp_path / "api-keys"
        keys.write_text("# rotated 2026-12\nprobe-key-1\nprobe-key-2\n")
        monkeypatch.setenv("RESNET_SERVE_API_KEYS_FILE", str(keys))
    app = create_app(Settings(model_dir=package))
    with running_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        assert healthcheck.check(port, timeout_s=5) is False  # 401 without the key
        monkeypatch.setenv("RESNET_SERVE_PORT", str(port))
        assert healthcheck.main() == 0
        monkeypatch.setenv("RESNET_SERVE_API_KEY_FOR_PROBES", "false")
        assert healthcheck.main() == 1  # the server still wants the key; this check sends none


# ------------------------------------------------------------------------- offline docs


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_the_internet(page: str) -> None:
    app = create_app(Settings(model_dir=Path("/nonexistent")))
    client = TestClient(app)  # no lifespan: the docs need no model
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.findall(r"https?://", html), "the page references an outside URL"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(asset.endswith(".js") for asset in assets), assets
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        assert len(fetched.content) > 1000, asset
    assert "/openapi.json" in html
    assert client.get("/openapi.json").status_code == 200
    if page == "/docs":
        assert client.get(app.swagger_ui_oauth2_redirect_url or "").status_code == 200


# ---------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_mounts_existing_files() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            assert source.startswith("./"), f"{name}: {volume} is not a bind mount of a file here"
            assert (DEPLOY / source).is_file(), f"{name}: {source} does not exist"
            assert target.startswith("/")
    build = compose()["services"]["resnet-serve"]["build"]
    assert (DEPLOY / build["context"] / "Dockerfile").is_file()
    assert build["target"] in parse_dockerfile()
    assert set(build["args"]) <= set(parse_dockerfile()["model-export"].args)


def test_compose_builds_fp32_and_serves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start's image build exports FP32 alone (1.5 GB peak RSS measured here;
    2.1 GiB with INT8's calibration, and a longer build), and serves what it built."""
    service = compose()["services"]["resnet-serve"]
    assert service["build"]["args"]["PRECISION"] == "fp32"
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, str(value))
    assert Settings().precision.value == service["build"]["args"]["PRECISION"]


def test_compose_service_env_and_ports_match_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = compose()["services"]
    service = stack["resnet-serve"]
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.host == "0.0.0.0"
    (ports,) = service["ports"]
    assert int(ports.split(":")[1]) == settings.port
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace is not None
    assert int(grace[1]) > settings.shutdown_grace_s
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yaml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"resnet-serve:{settings.port}"]
    mounted = [v.split(":")[1] for v in stack["prometheus"]["volumes"]]
    for pattern in prometheus["rule_files"]:
        assert any(fnmatch.fnmatch(target, pattern) for target in mounted), pattern
    dashboards = yaml.safe_load((DEPLOY / "compose" / "grafana-dashboards.yaml").read_text())
    folder = dashboards["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(folder + "/") for v in stack["grafana"]["volumes"])
    sources = yaml.safe_load((DEPLOY / "compose" / "grafana-datasources.yaml").read_text())
    assert sources["datasources"][0]["url"].endswith(":9090")
    assert "9090:9090" in stack["prometheus"]["ports"]


def test_dashboard_and_rules_are_valid() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "resnet-serve-dashboard.json").read_text())
    assert dashboard["panels"]
    assert dashboard["uid"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "resnet-serve-rules.yaml").read_text())
    for group in rules["groups"]:
        assert group["name"]
        assert group["rules"]


# ----------------------------------------------------------------------------- KServe


def kserve(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "kserve" / name).read_text())
    return loaded


def validate_containers(containers: list[dict[str, Any]], volumes: list[Any]) -> None:
    """Core Container objects, checked as a Pod by kubernetes-validate --strict."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": containers, "volumes": volumes},
    }
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_kserve_examples_match_their_crds_and_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = kserve("servingruntime.yaml")
    service = kserve("inferenceservice.yaml")
    jsonschema.validate(runtime, CRDS["ServingRuntime"]["schema"])
    jsonschema.validate(service, CRDS["InferenceService"]["schema"])
    validate_containers(runtime["spec"]["containers"], runtime["spec"]["volumes"])
    model = service["spec"]["predictor"]["model"]
    (container,) = runtime["spec"]["containers"]
    validate_containers(
        [
            {
                "name": "kserve-container",
                "image": container["image"],
                **{key: model[key] for key in ("env", "resources", "lifecycle") if key in model},
            }
        ],
        [],
    )
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # The runtime's command line and environment, through the service's own parser, with
    # the package where KServe's storage initializer puts it.
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for item in container["env"] + model.get("env", []):
        assert item["name"].removeprefix(ENV_PREFIX).lower() in Settings.model_fields
        monkeypatch.setenv(item["name"], item["value"])
    settings = Settings(**vars(build_parser().parse_args(container["args"])))
    assert settings.model_dir == Path("/mnt/models")
    assert settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    routes = set(create_app(settings).openapi()["paths"])  # every route the service documents
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == settings.port
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.port)
    if model["protocolVersion"] == "v2":  # the Open Inference Protocol's routes are served
        assert {"/v2/models/{model_name}/infer", "/v2/health/ready"} <= routes


# Kubernetes' terminationGracePeriodSeconds when a pod spec sets none.
KUBERNETES_DEFAULT_GRACE_S = 30


def test_kserve_drain_follows_the_charts_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """In RawDeployment mode the predictor's container (the runtime's, with the model's
    fields merged over it, as KServe merges them) sleeps in preStop before SIGTERM, and the
    pod's grace covers that sleep, the server's drain and the chart's margin
    (helm/resnet-serve: drain.*). The runtime itself carries no lifecycle hook: Knative
    refuses one."""
    runtime = kserve("servingruntime.yaml")
    service = kserve("inferenceservice.yaml")
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = runtime["spec"]["containers"]
    assert "lifecycle" not in container
    predictor = service["spec"]["predictor"]
    command = predictor["model"]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = int(command[1])
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for item in container["env"] + predictor["model"].get("env", []):  # the model's win
        monkeypatch.setenv(item["name"], item["value"])
    grace_s = Settings(**vars(build_parser().parse_args(container["args"]))).shutdown_grace_s
    chart = yaml.safe_load((ROOT / "helm" / "resnet-serve" / "values.yaml").read_text())
    assert sleep_s >= chart["drain"]["preStopSleepSeconds"]
    pod_grace_s = predictor.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE_S)
    assert pod_grace_s >= sleep_s + math.ceil(grace_s) + chart["drain"]["extraSeconds"]
