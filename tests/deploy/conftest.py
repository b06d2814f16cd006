"""The chart, loaded once for the deployment tests that render it."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.deploy.charts import loaded_chart


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    yield from loaded_chart()
