"""NNCF's post-training quantisation beside ONNX Runtime's, on the weight sets of
`model_export.int8_fidelity` (run its `build` first), judged by the export's own gate:

    pip install nncf==3.4.0     # not a dependency of the project: for this study only
    python -m model_export.nncf_study --out /tmp/int8-study [--schemes "NAME;NAME"]
    python -m model_export.int8_fidelity speed --out /tmp/int8-study   # timings: run alone
    python -m model_export.int8_fidelity table --out /tmp/int8-study

NNCF (ONNX backend) writes QDQ ONNX that ONNX Runtime runs. Its `fast_bias_correction`
shifts each layer's bias by the mean error quantisation left in that layer's output on the
calibration images, which ONNX Runtime's quantiser does not do. Activation ranges come from
NNCF's default estimator (`mean-minmax`: the mean over the calibration images of each
image's min and max; `mean-no-outliers` drops the outlying images first), from the min and
max over all of them (`minmax`), or from a histogram (`histogram`). Its accuracy control
quantises all but `float_layers`, ranks the quantisers by how much each costs a metric, and
returns the costliest to float until the metric holds: here the mean embedding cosine
against FP32 on other crops of the calibration photos (never the held-out photos the gate
uses). The fused normalisation stays in float as in the export; `float_layers` as
`--float-layers`. Results are added to the study's fidelity.json (with the convolutions
left in float), graphs beside the others, so `speed` and `table` include them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


@dataclass(frozen=True)
class NncfScheme:
    preset: str = "mixed"  # "performance": symmetric activations; "mixed": asymmetric
    float_layers: str = "none"
    # NNCF's default "mean-minmax"; "minmax", "histogram", "mean-no-outliers"
    activation_ranges: str = "mean-minmax"
    accuracy_control_max_drop: float | None = None  # mean embedding cosine, absolute


NNCF_SCHEMES = {
    "nncf performance, none": NncfScheme(preset="performance"),
    "nncf mixed, none": NncfScheme(),
    "nncf mixed, stem + classifier": NncfScheme(float_layers="stem-classifier"),
    "nncf mixed, islands": NncfScheme(float_layers="stem-stage1-classifier"),
    "nncf mixed, islands, minmax": NncfScheme(
        float_layers="stem-stage1-classifier", activation_ranges="minmax"
    ),
    "nncf mixed, islands, histogram": NncfScheme(
        float_layers="stem-stage1-classifier", activation_ranges="histogram"
    ),
    "nncf mixed, islands, mean-no-outliers": NncfScheme(
        float_layers="stem-stage1-classifier", activation_ranges="mean-no-outliers"
    ),
    "nncf mixed, stem + classifier, minmax": NncfScheme(
        float_layers="stem-classifier", activation_ranges="minmax"
    ),
    "nncf mixed, accuracy control": NncfScheme(
        float_layers="stem-classifier", accuracy_control_max_drop=0.004
    ),
    "nncf mixed, accuracy control, histogram": NncfScheme(
        float_layers="stem-classifier",
        activation_ranges="histogram",
        accuracy_control_max_drop=0.004,
    ),
    "nncf mixed, accuracy control, minmax": NncfScheme(
        float_layers="stem-classifier", activation_ranges="minmax", accuracy_control_max_drop=0.004
    ),
}


def _mean_embedding_cosine(
    model: onnx.ModelProto, images: Iterable[np.ndarray], reference: np.ndarray
) -> float:
    """Accuracy control's metric. NNCF hands it the dataset's items untransformed."""
    runner = verify.OnnxRunner(model.SerializeToString())
    _, embeddings = verify.run_batched(runner, np.stack(list(images)), 1)
    return float(verify.cosines(embeddings, reference).mean())


def quantise(
    source: Path, target: Path, calibration: Any, validation: Any, scheme: NncfScheme
) -> None:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = onnx.load(str(source))

    def as_input(image: np.ndarray) -> dict[str, np.ndarray]:
        return {graph.INPUT_NAME: image[None]}

    presets = {
        "mixed": nncf.QuantizationPreset.MIXED,
        "performance": nncf.QuantizationPreset.PERFORMANCE,
    }
    advanced = AdvancedQuantizationParameters()
    if scheme.activation_ranges != "mean-minmax":
        advanced.activations_range_estimator_params = {
            "minmax": RangeEstimatorParametersSet.MINMAX,
            "histogram": RangeEstimatorParametersSet.HISTOGRAM,
            "mean-no-outliers": RangeEstimatorParametersSet.MEAN_NO_OUTLIERS_MINMAX,
        }[scheme.activation_ranges]
    common: dict[str, Any] = {
        "preset": presets[scheme.preset],
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": len(calibration),
        "fast_bias_correction": True,
        "ignored_scope": nncf.IgnoredScope(names=variants.float_nodes(model, scheme.float_layers)),
    }
    if scheme.accuracy_control_max_drop is None:
        quantised = nncf.quantize(
            model,
            nncf.Dataset(list(calibration), as_input),
            advanced_parameters=advanced,
            **common,
        )
    else:
        _, reference = verify.run_batched(verify.onnx_runner(source), validation, 1)
        quantised = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(list(calibration), as_input),
            nncf.Dataset(list(validation), as_input),
            lambda candidate, items: _mean_embedding_cosine(candidate, items, reference),
            max_drop=scheme.accuracy_control_max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced,
            **common,
        )
    onnx.save(quantised, str(target))


def study(out: Path, schemes: dict[str, NncfScheme]) -> None:
    results_path = out / "fidelity.json"
    results = json.loads(results_path.read_text())
    spec = PreprocessSpec()
    calibration = calibration_set(spec)
    validation = calibration_set(spec, seed=1)[::2]  # other crops of the calibration photos
    inputs = gate_inputs(spec)
    for weights in WEIGHT_SETS:
        folder = out / weights.name
        fp32 = folder / "model.onnx"
        reference = verify.onnx_runner(fp32)
        for name, scheme in schemes.items():
            path = folder / f"{slug(name)}.onnx"
            started = time.perf_counter()
            quantise(fp32, path, calibration, validation, scheme)
            seconds = time.perf_counter() - started
            report = verify.verify(
                verify.onnx_runner(path), reference, inputs, Precision.INT8, "fp32-onnx"
            )
            float_nodes = _float_convolutions(path)
            figures = {
                **_figures(report),
                "nncf": asdict(scheme),
                "quantise_s": seconds,
                "float_convolutions": float_nodes,
            }
            results.setdefault(weights.name, {})[name] = figures
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{weights.name} {name}: {figures}", flush=True)


def _float_convolutions(path: Path) -> list[str]:
    """Conv/Gemm nodes whose weight is not dequantised: what stayed in float."""
    model = onnx.load(str(path), load_external_data=False)
    dequantised = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] not in dequantised
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_export.nncf_study")
    parser.add_argument("--out", type=Path, required=True, help="int8_fidelity's study folder")
    parser.add_argument("--schemes", help="scheme names separated by ; (default: all)")
    args = parser.parse_args(argv)
    chosen = NNCF_SCHEMES
    if args.schemes:
        chosen = {name: NNCF_SCHEMES[name] for name in args.schemes.split(";")}
    study(args.out, chosen)


if __name__ == "__main__":
    main()
