"""NNCF's post-training quantisation beside ONNX Runtime's, on the weight sets of
`model_export.int8_fidelity` (run its `build` first), judged by the export's own gate:

    pip install nncf==3.4.0     # not a dependency of the project: for this study only
    python -m model_export.nncf_study --out /tmp/int8-study
    python -m model_export.int8_fidelity speed --out /tmp/int8-study   # timings: run alone
    python -m model_export.int8_fidelity table --out /tmp/int8-study

NNCF (ONNX backend) writes QDQ ONNX that ONNX Runtime runs. Its `fast_bias_correction`
shifts each layer's bias by the mean error quantisation left in that layer's output on the
calibration images, which ONNX Runtime's quantiser does not do. The fused normalisation
stays in float as in the export; `float_layers` as `--float-layers`. Results are added to
the study's fidelity.json, graphs beside the others, so `speed` and `table` include them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from model_export import graph, variants, verify
from model_export.int8_fidelity import (
    WEIGHT_SETS,
    _figures,
    calibration_set,
    gate_inputs,
    slug,
)
from service.model_package import Precision, PreprocessSpec

# name: (NNCF preset, float_layers)
NNCF_SCHEMES = {
    "nncf performance, none": ("performance", "none"),
    "nncf mixed, none": ("mixed", "none"),
    "nncf mixed, stem + classifier": ("mixed", "stem-classifier"),
    "nncf mixed, islands": ("mixed", "stem-stage1-classifier"),
}


def quantise(source: Path, target: Path, calibration: Any, preset: str, float_layers: str) -> None:
    import nncf

    model = onnx.load(str(source))
    dataset = nncf.Dataset(list(calibration), lambda image: {graph.INPUT_NAME: image[None]})
    presets = {
        "mixed": nncf.QuantizationPreset.MIXED,
        "performance": nncf.QuantizationPreset.PERFORMANCE,
    }
    quantised = nncf.quantize(
        model,
        dataset,
        preset=presets[preset],
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(calibration),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=variants.float_nodes(model, float_layers)),
    )
    onnx.save(quantised, str(target))


def study(out: Path, schemes: dict[str, tuple[str, str]]) -> None:
    results_path = out / "fidelity.json"
    results = json.loads(results_path.read_text())
    spec = PreprocessSpec()
    calibration = calibration_set(spec)
    inputs = gate_inputs(spec)
    for weights in WEIGHT_SETS:
        folder = out / weights.name
        fp32 = folder / "model.onnx"
        reference = verify.onnx_runner(fp32)
        for name, (preset, float_layers) in schemes.items():
            path = folder / f"{slug(name)}.onnx"
            started = time.perf_counter()
            quantise(fp32, path, calibration, preset, float_layers)
            seconds = time.perf_counter() - started
            report = verify.verify(
                verify.onnx_runner(path), reference, inputs, Precision.INT8, "fp32-onnx"
            )
            figures = {**_figures(report), "nncf": [preset, float_layers], "quantise_s": seconds}
            results.setdefault(weights.name, {})[name] = figures
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{weights.name} {name}: {figures}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_export.nncf_study")
    parser.add_argument("--out", type=Path, required=True, help="int8_fidelity's study folder")
    args = parser.parse_args(argv)
    study(args.out, NNCF_SCHEMES)


if __name__ == "__main__":
    main()
