from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.cheap_package import write_cheap_package


@pytest.fixture(scope="module")
def cheap_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid package whose graph costs microseconds an image (loadtests.cheap_package)."""
    return write_cheap_package(tmp_path_factory.mktemp("cheap") / "package")
