"""Whether this install can serve gRPC (`--grpc-port`), asked once at start-up by the
process that starts the server, before it spawns any other: a grpcio or protobuf missing,
or older than the committed stubs were generated for, is one line naming the versions and
the fix, not a traceback in every front-end.

The stubs run on runtimes as new as their generator or newer (scripts/gen-grpc.sh writes
them with the oldest one supported), so the floors are read from the stubs themselves.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

PROTO_DIR = Path(__file__).parent / "proto"
FIX_EXTRA = "pip install 'resnet-serve[grpc]'"


def _generated_version(stub: str, pattern: str) -> str:
    found = re.search(pattern, (PROTO_DIR / stub).read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no generator version in {stub}: regenerate with scripts/gen-grpc.sh")
    return found[1]


def protobuf_gencode_version() -> str:
    """The protobuf release whose protoc wrote the messages: the oldest runtime they accept."""
    return _generated_version("grpc_predict_v2_pb2.py", r"^# Protobuf Python Version: (\S+)$")


def grpcio_generated_version() -> str:
    """The grpcio-tools release that wrote the service stubs: the oldest grpcio they accept."""
    return _generated_version(
        "grpc_predict_v2_pb2_grpc.py", r"^GRPC_GENERATED_VERSION = '([^']+)'$"
    )


def installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


def _protobuf_too_old() -> tuple[type[Exception], ...]:
    """What importing the messages raises on a protobuf older than their gencode: its
    VersionError, or, before 5.27 (which has no runtime check), an ImportError."""
    try:
        from google.protobuf.runtime_version import VersionError
    except ImportError:
        return (ImportError,)
    return (VersionError, ImportError)


def grpc_install_problem() -> str | None:
    """None when the stubs import here; else why not, in one line with the fix. Importing
    them is the check: it is exactly what serving gRPC does first."""
    try:
        import google.protobuf
        import grpc
    except ImportError:
        return (
            f"--grpc-port needs grpcio and protobuf (installed: grpcio {installed('grpcio')}, "
            f"protobuf {installed('protobuf')}): {FIX_EXTRA}"
        )
    try:
        from service.frontend.v2.proto import grpc_predict_v2_pb2  # noqa: F401
    except _protobuf_too_old() as exc:
        gencode = protobuf_gencode_version()
        return (
            f"--grpc-port: the gRPC stubs were generated for protobuf {gencode} or newer, but "
            f"protobuf {google.protobuf.__version__} is installed ({type(exc).__name__}): "
            f"pip install 'protobuf>={gencode}'"
        )
    try:
        from service.frontend.v2.proto import grpc_predict_v2_pb2_grpc  # noqa: F401
    except RuntimeError as exc:  # what the stubs raise on a grpcio older than themselves
        generated = grpcio_generated_version()
        return (
            f"--grpc-port: the gRPC stubs were generated for grpcio {generated} or newer, but "
            f"grpcio {grpc.__version__} is installed ({type(exc).__name__}): "
            f"pip install 'grpcio>={generated}'"
        )
    return None
