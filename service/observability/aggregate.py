"""The whole server's metrics from several processes' registries, under today's names.

Each process keeps its own `ServiceMetrics` registry. A scrape on any front-end asks the
engine, which asks every front-end for its families (`plain`), adds its own, and merges
them (`merge`): samples with the same name and labels are summed. That is right because
each family has one owner: the front-ends own the request families (counts, durations,
requests in progress: a sum over the live ones) and the engine everything else (queue
depth, batches, readiness, the model), except decode times, which both sides observe
(the engine when it decodes in the batch). So a gauge such as the queue depth is one
number, never a sum over processes, and nothing depends on pids. A front-end that exits
keeps its counts in the total (`Retired`), so counters never go backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

# Families a front-end reports; the engine reports all others (and decode times too).
FRONTEND_FAMILIES = frozenset(
    {
        "resnet_requests",
        "resnet_request_duration_seconds",
        "resnet_requests_in_progress",
        "resnet_images",
        "resnet_decode_duration_seconds",
        "resnet_rejections",
    }
)
SHARED_FAMILIES = frozenset({"resnet_decode_duration_seconds"})
# Plain form: [name, type, documentation, unit, [[sample, {labels}, value, exemplar]]],
# exemplar None or [{labels}, value, timestamp]; MessagePack-friendly, no pickling.
Family = list[Any]


def plain(
    registry: CollectorRegistry, owned: Iterable[str] | None, exclude: Iterable[str] = ()
) -> list[Family]:
    """The registry's families in plain form: only `owned` ones when given, never `exclude`d."""
    keep = None if owned is None else frozenset(owned)
    skip = frozenset(exclude)
    families: list[Family] = []
    for metric in registry.collect():
        if (keep is not None and metric.name not in keep) or metric.name in skip:
            continue
        samples = [
            [
                sample.name,
                dict(sample.labels),
                float(sample.value),
                None
                if sample.exemplar is None
                else [
                    dict(sample.exemplar.labels),
                    float(sample.exemplar.value),
                    sample.exemplar.timestamp,
                ],
            ]
            for sample in metric.samples
        ]
        families.append([metric.name, metric.type, metric.documentation, metric.unit, samples])
    return families


def merge(*sources: Iterable[Family]) -> list[Family]:
    """Sum samples of the same name and labels across sources, family by family, in the
    order first seen; an exemplar is kept from any source that has one."""
    merged: dict[str, Family] = {}
    index: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Any]] = {}
    for families in sources:
        for name, kind, documentation, unit, samples in families:
            family = merged.setdefault(name, [name, kind, documentation, unit, []])
            for sample_name, labels, value, exemplar in samples:
                key = (name, sample_name, tuple(sorted(labels.items())))
                existing = index.get(key)
                if existing is None:
                    entry = [sample_name, dict(labels), value, exemplar]
                    index[key] = entry
                    family[4].append(entry)
                else:
                    existing[2] += value
                    if existing[3] is None:
                        existing[3] = exemplar
    return list(merged.values())


def counts_only(families: Iterable[Family]) -> list[Family]:
    """What outlives a process: counters and histograms (its gauges die with it)."""
    return [family for family in families if family[1] in ("counter", "histogram", "summary")]


class Retired:
    """The counts of front-ends that have exited, kept in every later total."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def add(self, families: Iterable[Family]) -> None:
        self.families = merge(self.families, counts_only(families))


class PlainCollector(Collector):
    """Serves plain families as a registry's metrics: given ones, or fetched from
    `source` at each collection (the separate metrics port)."""

    def __init__(self, source: Callable[[], list[Family]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for name, kind, documentation, unit, samples in self._source():
            metric = Metric(name, documentation, kind, unit)
            for sample_name, labels, value, exemplar in samples:
                metric.add_sample(
                    sample_name,
                    labels,
                    value,
                    exemplar=None if exemplar is None else Exemplar(*exemplar),
                )
            yield metric


def render(families: list[Family], accept: str | None) -> tuple[bytes, str]:
    """The exposition the scraper asked for (OpenMetrics when its Accept header names it,
    with exemplars; else the classic text format)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlainCollector(lambda: families))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
