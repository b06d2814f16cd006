"""Lower-precision variants of the FP32 graph: FP16 for GPUs, INT8 for CPUs.

Both keep the graph's interface: uint8 pixels in, float32 `logits` and `embedding` out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from model_export import calibration
from model_export.errors import ExportError
from model_export.graph import check_graph
from service.model_package import PreprocessSpec


def to_fp16(source: Path, target: Path) -> None:
    """Weights and activations in float16; the uint8 input and float32 outputs stay."""
    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(target))
    check_graph(target)


def preprocessing_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes between the graph input and the first convolution: the fused normalisation.

    They stay in float. Quantised, the multiply and add on full-resolution pixels become
    QLinearMul/QLinearAdd, which cost more than the float ops they replace (measured:
    ~25% of INT8 ResNet-50 time) and lose input precision before the first convolution.
    """
    names = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            break
        names.append(node.name)
    return names


CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    # Ranges computed here (calibration.mse_calibration), handed over as Percentile's.
    "mse": CalibrationMethod.Percentile,
}
DEFAULT_CALIBRATION = "percentile"
PERCENTILE = 99.99
# What stays in float besides the fused normalisation (see docs/model-package.md#int8).
FLOAT_LAYERS = ("none", "stem-classifier", "stem-stage1-classifier")
DEFAULT_FLOAT_LAYERS = "stem-stage1-classifier"


def stem_and_classifier_nodes(model: onnx.ModelProto, logits: str = "logits") -> list[str]:
    """The first convolution and the classifier (Gemm, or MatMul + Add) that makes `logits`.

    These two are where INT8 hurts most on trained-like weights: the stem sees raw pixels
    with a few large-magnitude filters, and the classifier turns every rounding error in the
    embedding straight into the logits. Together they are ~3% of ResNet-50's operations.
    """
    names: list[str] = []
    first_conv = next((node for node in model.graph.node if node.op_type == "Conv"), None)
    if first_conv is not None:
        names.append(first_conv.name)
    producers = {output: node for node in model.graph.node for output in node.output}
    node = producers.get(logits)
    while node is not None and node.op_type in ("Gemm", "MatMul", "Add", "Flatten", "Reshape"):
        names.append(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            break
        node = producers.get(node.input[0])
    return names


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name → height, for the 4-D float tensors shape inference can size."""
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value"):
            sizes[info.name] = dims[2].dim_value
    return sizes


def stage1_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes after the stem that work at the first stage's resolution (the output size
    of the first residual Add): ResNet's first stage, the stem's max-pool, and in bottleneck
    networks the first 1x1 convolution of stage 2, which still runs at that size."""
    sizes = _spatial_sizes(model)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        return []
    nodes = list(model.graph.node)
    after_stem = nodes[[node.name for node in nodes].index(convs[0].name) + 1 :]
    first_add = next(
        (node for node in after_stem if node.op_type == "Add" and node.output[0] in sizes), None
    )
    if first_add is None:
        return []
    stage1 = sizes[first_add.output[0]]
    return [node.name for node in after_stem if node.output and sizes.get(node.output[0]) == stage1]


@dataclass(frozen=True)
class Int8Scheme:
    """How the INT8 variant is calibrated and what it leaves in float.

    `symmetric_ranges` is ONNX Runtime's `CalibTensorRangeSymmetric`: a range [-T, T] taken
    from |x| (the percentile calibrator's own default), which spends half the uint8 codes
    on values a post-ReLU tensor never has; asymmetric ranges are [low, high].
    """

    method: str = DEFAULT_CALIBRATION
    percentile: float = PERCENTILE
    float_layers: str = DEFAULT_FLOAT_LAYERS
    symmetric_ranges: bool = True
    per_channel: bool = True
    weight_symmetric: bool = True
    # The stem's input (the normalised pixels) quantised over the whole pixel range rather
    # than calibrated: every uint8 pixel value is representable, seen in calibration or not.
    pixel_range_input: bool = False

    def check(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ExportError(
                f"unknown calibration method {self.method!r}; "
                f"choose one of: {', '.join(CALIBRATION_METHODS)}"
            )
        if self.float_layers not in FLOAT_LAYERS:
            raise ExportError(
                f"unknown float layers {self.float_layers!r}; "
                f"choose one of: {', '.join(FLOAT_LAYERS)}"
            )
        if not 0 < self.percentile <= 100:
            raise ExportError(f"percentile must be in (0, 100], got {self.percentile}")

    def method_name(self) -> str:
        if self.method == "percentile":
            return f"Percentile ({self.percentile:g})"
        return {"minmax": "MinMax", "entropy": "Entropy", "mse": "MSE"}[self.method]

    def extra_options(self) -> dict[str, object]:
        options: dict[str, object] = {
            "CalibTensorRangeSymmetric": self.symmetric_ranges,
            "WeightSymmetric": self.weight_symmetric,
        }
        if self.method == "percentile":
            options["CalibPercentile"] = self.percentile
        return options


def float_nodes(model: onnx.ModelProto, float_layers: str) -> list[str]:
    """The nodes `float_layers` keeps in float, the fused normalisation always among them."""
    excluded = preprocessing_nodes(model)
    if float_layers != "none":
        excluded += stem_and_classifier_nodes(model)
    if float_layers == "stem-stage1-classifier":
        excluded += stage1_nodes(model)
    return excluded


def pixel_range(spec: PreprocessSpec) -> tuple[float, float]:
    """The lowest and highest value the fused normalisation can output, over all channels."""
    lows = [(0.0 - mean) / std for mean, std in zip(spec.mean, spec.std, strict=True)]
    highs = [(1.0 - mean) / std for mean, std in zip(spec.mean, spec.std, strict=True)]
    return min(lows), max(highs)


def _overrides(
    model: onnx.ModelProto, scheme: Int8Scheme, excluded: list[str], spec: PreprocessSpec
) -> dict[str, list[dict[str, object]]]:
    first_conv = next((node for node in model.graph.node if node.op_type == "Conv"), None)
    if not scheme.pixel_range_input or first_conv is None or first_conv.name in excluded:
        return {}
    low, high = pixel_range(spec)
    return {
        first_conv.input[0]: [
            {"rmin": np.array(low, dtype=np.float32), "rmax": np.array(high, dtype=np.float32)}
        ]
    }


def to_int8(
    source: Path,
    target: Path,
    samples: np.ndarray,
    input_name: str,
    spec: PreprocessSpec,
    scheme: Int8Scheme | None = None,
    calibration_cache: Path | None = None,
) -> dict[str, object]:
    """Static QDQ quantisation: int8 weights, uint8 activations, as `scheme` says.

    uint8 activations with int8 weights is the combination ONNX Runtime's x86 kernels
    (VNNI) run fastest. docs/model-package.md#int8 has each choice's fidelity and speed.
    `calibration_cache` (a JSON file ONNX Runtime writes, then reads) lets several schemes
    with the same calibration share one calibration run.
    """
    scheme = scheme or Int8Scheme()
    scheme.check()
    model = onnx.load(str(source))
    excluded = float_nodes(model, scheme.float_layers)
    overrides = _overrides(model, scheme, excluded, spec)
    del model
    extra_options = {
        **scheme.extra_options(),
        "CalibStridedMinMax": 1,
        "TensorQuantOverrides": overrides,
    }
    settings: dict[str, object] = {
        "format": "QDQ",
        "activations": "uint8 " + ("symmetric" if scheme.symmetric_ranges else "asymmetric"),
        "weights": "int8 "
        + ("per-channel" if scheme.per_channel else "per-tensor")
        + ("" if scheme.weight_symmetric else " asymmetric"),
        "calibration_method": scheme.method_name(),
        "calibration_samples": len(samples),
        "calibration_batch": calibration.CALIBRATION_BATCH,
        "float_layers": scheme.float_layers,
        "float_nodes": excluded,
        "range_overrides": {
            name: [float(value[0]["rmin"]), float(value[0]["rmax"])]  # type: ignore[arg-type]
            for name, value in overrides.items()
        },
    }
    # The quantiser logs advice through the root logger; keep the progress output clean.
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            reader = calibration.RangedReader(input_name, samples, calibration.CALIBRATION_BATCH)
            if scheme.method == "mse" and (
                calibration_cache is None or not calibration_cache.exists()
            ):
                if calibration_cache is None:
                    calibration_cache = (
                        Path(stack.enter_context(tempfile.TemporaryDirectory())) / "ranges.json"
                    )
                calibration.mse_calibration(source, samples, input_name, calibration_cache)
            quantize_static(
                str(source),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=scheme.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[scheme.method],
                nodes_to_exclude=excluded,
                extra_options=extra_options,
                calibration_cache_path=calibration_cache,
            )
    except Exception as exc:
        raise ExportError(f"INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.getLogger().setLevel(root_level)
    check_graph(target)
    return settings
