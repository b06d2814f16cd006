"""Writing the package directory: all files land in a temporary sibling directory that is
renamed into place only once everything is written and verified, so a failed or
interrupted export never leaves a half-written package where the service would load it."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from model_export.errors import ExportError
from service.model_package import LABELS_FILE, MANIFEST_FILE, Manifest


def tool_versions(*distributions: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_output_path(out: Path, force: bool) -> None:
    """Fail before the long steps if the package could not be written at the end.

    Creates nothing: missing parent directories are made only when the package is staged.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} already exists; pass --force to replace it")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot create {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"output path {out} is not writable (no write permission on {ancestor})")


@contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, removed unless `publish` moved it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def publish(staging: Path, out: Path, manifest: Manifest, labels: list[str]) -> None:
    """Write labels and manifest last, then swap the staging directory into place."""
    write_json(staging / LABELS_FILE, labels)
    (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    os.chmod(staging, 0o755)
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
        out.rename(previous)
    try:
        staging.rename(out)
    except OSError as exc:
        if previous is not None:
            previous.rename(out)
        raise ExportError(f"cannot move the package into {out}: {exc.strerror or exc}") from exc
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
