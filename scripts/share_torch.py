"""Link this environment's PyTorch into DIR, for another venv to use through a .pth file.

scripts/test-install.sh builds fresh venvs to test the dependency floors and today's
releases; torch and torchvision are pinned to one version in pyproject.toml, and with their
CUDA libraries they are gigabytes, so those venvs borrow .venv's instead of installing
them again. Linked: torch, torchvision and every `nvidia-*`, `cuda-*` and `triton`
distribution torch requires (files and metadata, so pip and importlib.metadata see them
installed). Their pure-Python requirements (sympy, jinja2, numpy, ...) are not linked:
the venv resolves those itself, at the versions under test.

Usage: .venv/bin/python scripts/share_torch.py DIR   (prints the distributions linked)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("torch", "torchvision")
BINARY = re.compile(r"^(nvidia-|cuda-|triton$)")


def closure() -> list[metadata.Distribution]:
    """torch, torchvision and the CUDA distributions reachable from their requirements
    (with the extras they ask for: `cuda-toolkit[cublas,...]`)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(root) for root in ROOTS]
    while todo:
        wanted = todo.pop()
        name = canonicalize_name(wanted.name)
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in [*wanted.extras, ""]
            ):
                continue
            if BINARY.match(canonicalize_name(requirement.name)):
                todo.append(requirement)
    return list(found.values())


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The first path component of every file the distribution installed (its packages,
    shared libraries and .dist-info), skipping scripts outside site-packages."""
    return {
        file.parts[0]
        for file in dist.files or []
        if file.parts and file.parts[0] not in ("..", "__pycache__")
    }


def main(argv: list[str]) -> int:
    (target_arg,) = argv
    target = Path(target_arg)
    target.mkdir(parents=True, exist_ok=True)
    dists = closure()
    for dist in dists:
        site = Path(str(dist.locate_file("")))
        for entry in top_level_entries(dist):
            link = target / entry
            if not link.exists():  # namespace dirs (nvidia/, cuda/) hold several: link once
                link.symlink_to(site / entry)
    print(" ".join(sorted(f"{dist.metadata['Name']}=={dist.version}" for dist in dists)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
