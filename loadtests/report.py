"""The benchmark's report: the ratios the project targets (met or not), printed as a table
and plotted, from the JSON report `python -m loadtests` writes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtests import openloop

SERVICE, NAIVE = "resnet-serve", "naive"  # the servers' names in reports


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the performance issues with its measured figure."""
    rows = []
    runs = report["runs"]
    for precision, run in runs.items():
        served = run["server"]
        headline = run.get("open_loop", {}).get("summary", {}).get(SERVICE)
        if headline:
            for load, point in headline["loads"].items():
                bound = 0.7 if float(load) == 0.8 else 1.0
                rows.append(
                    {
                        "target": f"{precision}: p99 at {float(load):.0%} / naive <= {bound}",
                        "value": point["p99_over_baseline"],
                        "spread": [point["p99_over_baseline_min"], point["p99_over_baseline_max"]],
                        "bound": bound,
                    }
                )
            rows.append(
                {
                    "target": f"{precision}: saturation / naive >= 1.05",
                    "value": headline["saturation_over_baseline"],
                    "spread": [
                        headline["saturation_over_baseline_min"],
                        headline["saturation_over_baseline_max"],
                    ],
                    "bound": 1.05,
                    "at_least": True,
                }
            )
        if "served_over_ceiling" in served:
            rows.append(
                {
                    "target": f"{precision}: served / in-process ceiling >= 0.95",
                    "value": served["served_over_ceiling"],
                    "bound": 0.95,
                    "at_least": True,
                }
            )
            rows.append(
                {
                    "target": f"{precision}: lone p50 / in-process single image <= 1.1",
                    "value": served["lone_over_single"],
                    "bound": 1.1,
                }
            )
        if "large_over_small" in served:
            rows.append(
                {
                    "target": f"{precision}: 12MP / 0.2MP saturation >= 0.333",
                    "value": served["large_over_small"],
                    "bound": 0.333,
                    "at_least": True,
                }
            )
    if (
        "fp32" in runs
        and "int8" in runs
        and all("served_images_per_s" in r["server"] for r in runs.values())
    ):
        rows.append(
            {
                "target": "int8 / fp32 served saturation",
                "value": runs["int8"]["server"]["served_images_per_s"]
                / runs["fp32"]["server"]["served_images_per_s"],
            }
        )
    for row in rows:
        if "bound" in row:
            met = (
                row["value"] >= row["bound"]
                if row.pop("at_least", False)
                else row["value"] <= row["bound"]
            )
            row["met"] = met
    return rows  # fmt: skip


def print_table(report: dict[str, Any]) -> None:
    print(
        "\n=== resnet-serve benchmark:",
        report["machine"]["cpu"],
        f"({report['machine']['cores']} cores)",
    )
    for precision, run in report["runs"].items():
        served = run["server"]
        print(f"\n[{precision}]")
        if "open_loop" in run:
            openloop.print_summary(run["open_loop"])
        for row in served.get("rounds", []):
            print(
                f"  round: ceiling {row['ceiling_images_per_s']:.1f} img/s (batch "
                f"{served['ceiling_batch_size']}), served {row['served_images_per_s']:.1f}; "
                f"one image in-process {row['single_image_ms']:.1f} ms (decode "
                f"{row['decode_ms']:.1f} + infer {row['infer_batch1_ms']:.1f}), "
                f"lone request p50 {row['lone_p50_ms']:.1f} ms"
            )
        print(
            f"  saturation concurrency x{served['saturation_concurrency']}, "
            f"multipart {served['multipart']['images_per_s']:.1f} img/s"
        )
    print("\n  target                                                 measured  met")
    for row in report["ratios"]:
        spread = f" [{row['spread'][0]:.2f}-{row['spread'][1]:.2f}]" if "spread" in row else ""
        met = {True: "yes", False: "NO"}.get(row.get("met"), "")
        print(f"  {row['target']:<55}{row['value']:7.3f}{spread}  {met}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(p, r) for p, r in report["runs"].items() if "open_loop" in r]
    if not runs:
        return
    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for axis, (precision, run) in zip(axes[0], runs, strict=True):
        summary = run["open_loop"]["summary"]
        base_rate = run["open_loop"]["baseline_requests_per_s"]
        for name, row in summary.items():
            loads = [float(load) for load in row["loads"]]
            rates = [load * base_rate for load in loads]
            p99 = [point["p99_ms"] for point in row["loads"].values()]
            p50 = [point["p50_ms"] for point in row["loads"].values()]
            (line,) = axis.plot(rates, p99, "^-", label=f"{name} p99")
            axis.plot(rates, p50, "o:", color=line.get_color(), label=f"{name} p50")
        axis.set_xlabel("offered load (requests/s, Poisson)")
        axis.set_ylabel("latency (ms, from scheduled send; median of rounds)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
        axis.set_title(f"{precision}: open loop vs the naive server")
    figure.suptitle(
        f"resnet-serve on {report['machine']['cpu']} ({report['machine']['cores']} cores)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
