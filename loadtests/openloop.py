"""The benchmark's headline: `resnet-serve` against the naive baseline under open-loop load.

Real traffic is open-loop: requests arrive whether or not earlier ones were answered. Both
servers run side by side on the same package. First each one's saturation throughput
(closed loop, the best over a few concurrency levels), in rounds with the servers' order
flipped each round; then, in rounds again, Poisson arrivals at fractions of the *naive*
server's saturation, with latency counted from each request's scheduled send time. The
servers take turns within each load, and the order flips every round, so slow drifts of
this shared machine hit both alike. Each figure is the median over rounds, reported as a
ratio to the naive server's (the median of the per-round ratios), with the spread of the
per-round ratios so a reader can tell a win from noise.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from typing import Any

from loadtests import client

SETTLE_S = 1.0  # between points: let the previous point's backlog drain


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int

    def requests(self, bodies: list[bytes]) -> list[bytes]:
        hostport = f"{self.host}:{self.port}"
        return [client.raw_request("/predict", body, "image/jpeg", hostport) for body in bodies]


@dataclass(frozen=True)
class Plan:
    loads: list[float]  # fractions of the naive server's saturation
    rounds: int
    requests_per_point: int  # this many requests per server, load and round ...
    max_point_s: float  # ... unless this many seconds pass first
    concurrency: list[int]  # closed-loop levels for saturation
    closed_s: float
    warmup_s: float


async def saturation(target: Target, bodies: list[bytes], plan: Plan) -> dict[str, Any]:
    """The best closed-loop throughput over `plan.concurrency`, in one round."""
    requests = target.requests(bodies)
    levels = []
    for concurrency in plan.concurrency:
        result = await client.closed_loop(
            target.host, target.port, requests, concurrency, plan.closed_s, plan.warmup_s
        )
        levels.append(result.summary())
    best = max(levels, key=lambda level: float(level["requests_per_s"]))
    return {
        "levels": levels,
        "requests_per_s": best["requests_per_s"],
        "concurrency": best["target"],
    }


async def compare(
    targets: list[Target], baseline: str, bodies: list[bytes], plan: Plan
) -> dict[str, Any]:
    """Saturation of each target, then open-loop rounds at fractions of the baseline's."""
    saturations = await saturation_rounds(targets, bodies, plan)
    base_rate = float(saturations[baseline]["requests_per_s"])
    points: dict[str, dict[float, list[dict[str, Any]]]] = {
        target.name: {load: [] for load in plan.loads} for target in targets
    }
    for round_index in range(plan.rounds):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for load in plan.loads:
            rate = base_rate * load
            for target in order:
                await asyncio.sleep(SETTLE_S)
                result = await client.open_loop(
                    target.host, target.port, target.requests(bodies), rate, plan.max_point_s,
                    seed=round_index, count=plan.requests_per_point,
                )  # fmt: skip
                summary = result.summary() | {"round": round_index, "load": load}
                points[target.name][load].append(summary)
                print(
                    f"  round {round_index + 1} {load:.0%} {target.name:<12} "
                    f"p50 {result.percentile_ms(50):7.1f}  p99 {result.percentile_ms(99):7.1f} ms"
                    f"  ({result.completed} ok, {result.failed} failed)"
                    f"{steal_note(result)}",
                    flush=True,
                )
    return {
        "baseline": baseline,
        "baseline_requests_per_s": base_rate,
        "saturation": saturations,
        "points": {
            name: {str(load): rows for load, rows in by_load.items()}
            for name, by_load in points.items()
        },
        "summary": summarise(points, baseline, saturations),
    }


def steal_note(result: client.LoadResult) -> str:
    """The CPU the hypervisor took from this machine during a point, where it took any:
    a tail that coincides with it is the host's, not the server's."""
    steal = result.machine_cores().get("steal_cores", 0.0)
    return f"  steal {steal:.2f} cores" if steal >= 0.01 else ""


async def saturation_rounds(
    targets: list[Target], bodies: list[bytes], plan: Plan
) -> dict[str, dict[str, Any]]:
    """Each target's saturation in `plan.rounds` rounds, the order flipped every round: the
    median over rounds, each round's figure, and the concurrency of its best round."""
    rounds: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
    for round_index in range(plan.rounds):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for target in order:
            result = await saturation(target, bodies, plan)
            rounds[target.name].append(result)
            print(
                f"  round {round_index + 1} {target.name}: saturation "
                f"{result['requests_per_s']:.1f} req/s (x{int(result['concurrency'])})",
                flush=True,
            )
    saturations = {}
    for name, results in rounds.items():
        best = max(results, key=lambda result: float(result["requests_per_s"]))
        saturations[name] = {
            "levels": [level for result in results for level in result["levels"]],
            "rounds": [float(result["requests_per_s"]) for result in results],
            "requests_per_s": statistics.median(float(r["requests_per_s"]) for r in results),
            "concurrency": best["concurrency"],
        }
    return saturations


def summarise(
    points: dict[str, dict[float, list[dict[str, Any]]]],
    baseline: str,
    saturations: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Per target and load: median p50/p99 over rounds, and the p99 ratio to the baseline
    (the median of the per-round ratios, with their min and max); the same for saturation."""
    out: dict[str, Any] = {}
    for name, by_load in points.items():
        loads = {}
        for load, rows in by_load.items():
            base_rows = points[baseline][load]
            ratios = [
                row["p99_ms"] / base["p99_ms"] for row, base in zip(rows, base_rows, strict=True)
            ]
            loads[str(load)] = {
                "p50_ms": statistics.median(row["p50_ms"] for row in rows),
                "p99_ms": statistics.median(row["p99_ms"] for row in rows),
                "failed": sum(int(row["failed"]) for row in rows),
                "requests": sum(int(row["completed"]) + int(row["failed"]) for row in rows),
                "p99_over_baseline": statistics.median(ratios),
                "p99_over_baseline_min": min(ratios),
                "p99_over_baseline_max": max(ratios),
            }
        sat_ratios = [
            own / base
            for own, base in zip(
                saturations[name]["rounds"], saturations[baseline]["rounds"], strict=True
            )
        ]
        out[name] = {
            "saturation_requests_per_s": saturations[name]["requests_per_s"],
            "saturation_over_baseline": statistics.median(sat_ratios),
            "saturation_over_baseline_min": min(sat_ratios),
            "saturation_over_baseline_max": max(sat_ratios),
            "loads": loads,
        }
    return out


def print_summary(result: dict[str, Any]) -> None:
    baseline = result["baseline"]
    for name, row in result["summary"].items():
        print(
            f"  {name}: saturation {row['saturation_requests_per_s']:.1f} req/s "
            f"= {row['saturation_over_baseline']:.2f} x {baseline} "
            f"[{row['saturation_over_baseline_min']:.2f}-{row['saturation_over_baseline_max']:.2f}]"
        )
        for load, point in row["loads"].items():
            print(
                f"    {float(load):4.0%}: p50 {point['p50_ms']:7.1f}  p99 {point['p99_ms']:7.1f} ms"
                f"  p99 / {baseline} {point['p99_over_baseline']:.2f} "
                f"[{point['p99_over_baseline_min']:.2f}-{point['p99_over_baseline_max']:.2f}]"
                f"  failed {point['failed']}/{point['requests']}"
            )
