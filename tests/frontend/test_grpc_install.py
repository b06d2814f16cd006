"""`--grpc-port` on an install that cannot serve gRPC: a protobuf or grpcio older than the
committed stubs, or none at all, is refused at start-up in one line that names the
versions and the fix, before any process is spawned; and the `grpc` extra's floors are
the versions the stubs were generated for."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loadtests.server import free_port
from service.frontend.v2.grpc_install import (
    grpc_install_problem,
    grpcio_generated_version,
    protobuf_gencode_version,
)

ROOT = Path(__file__).resolve().parents[2]
# Run by sitecustomize in the child, before resnet-serve imports anything.
OLD_PROTOBUF = """
import google.protobuf, google.protobuf.runtime_version as runtime
google.protobuf.__version__ = "5.26.1"
runtime.MAJOR, runtime.MINOR, runtime.PATCH = 5, 26, 1
"""
OLD_GRPCIO = """
import grpc
grpc.__version__ = "1.60.0"
"""
NO_GRPCIO = """
import sys
sys.modules["grpc"] = None  # any `import grpc` now fails, as without the grpc extra
"""


def test_the_grpc_extras_floors_are_the_versions_the_stubs_were_generated_for() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in extras["optional-dependencies"]["grpc"]:
        found = re.fullmatch(r"([a-z]+)>=([0-9.]+)", line)  # a floor, and nothing else
        assert found is not None, line
        floors[found[1]] = found[2]
    assert floors == {"protobuf": protobuf_gencode_version(), "grpcio": grpcio_generated_version()}


def test_this_install_can_serve_grpc() -> None:
    assert grpc_install_problem() is None


@pytest.mark.parametrize(
    ("fake", "names"),
    [
        (OLD_PROTOBUF, ["protobuf 5.26.1", f"'protobuf>={protobuf_gencode_version()}'"]),
        (OLD_GRPCIO, ["grpcio 1.60.0", f"pip install 'grpcio>={grpcio_generated_version()}'"]),
        (NO_GRPCIO, ["pip install 'resnet-serve[grpc]'"]),
    ],
    ids=["old-protobuf", "old-grpcio", "no-grpcio"],
)
def test_grpc_port_on_an_install_that_cannot_serve_it_exits_2_in_one_line(
    fake: str, names: list[str], resnet18_package: Path, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(fake)
    command = [sys.executable, "-m", "service.cli", "--model-dir", str(resnet18_package)]
    command += ["--port", str(free_port()), "--grpc-port", str(free_port()), "--workers", "2"]
    done = subprocess.run(
        command,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("resnet-serve: error: --grpc-port"), lines[0]
    for name in names:
        assert name in lines[0]
    if fake is OLD_PROTOBUF:  # both versions named: what is there, and what the stubs need
        assert f"generated for protobuf {protobuf_gencode_version()}" in lines[0]
        assert f"pip install 'protobuf>={protobuf_gencode_version()}'" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert "processes:" not in done.stderr + done.stdout  # refused before spawning anything
