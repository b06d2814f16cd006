"""Lower-precision variants of the FP32 graph: FP16 for GPUs, INT8 for CPUs.

Both keep the graph's interface: uint8 pixels in, float32 `logits` and `embedding` out.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from model_export.errors import ExportError
from model_export.graph import check_graph


def to_fp16(source: Path, target: Path) -> None:
    """Weights and activations in float16; the uint8 input and float32 outputs stay."""
    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(target))
    check_graph(target)


class _ArrayReader(CalibrationDataReader):
    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = 8) -> None:
        self._batches = iter(
            [
                {input_name: samples[start : start + batch_size]}
                for start in range(0, len(samples), batch_size)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


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


def to_int8(
    source: Path,
    target: Path,
    calibration: np.ndarray,
    input_name: str,
    method: str = DEFAULT_CALIBRATION,
    float_layers: str = DEFAULT_FLOAT_LAYERS,
) -> dict[str, object]:
    """Static QDQ quantisation: per-channel int8 weights, uint8 activations.

    uint8 activations with int8 weights is the combination ONNX Runtime's x86 kernels
    (VNNI) run fastest; per-channel weights keep the accuracy of each filter. By default the
    stem convolution, the first stage and the classifier stay in float
    (`stem_and_classifier_nodes`, `stage1_nodes`; docs/model-package.md has the figures).
    """
    if method not in CALIBRATION_METHODS:
        raise ExportError(
            f"unknown calibration method {method!r}; "
            f"choose one of: {', '.join(CALIBRATION_METHODS)}"
        )
    model = onnx.load(str(source))
    excluded = preprocessing_nodes(model)
    if float_layers not in FLOAT_LAYERS:
        raise ExportError(
            f"unknown float layers {float_layers!r}; choose one of: {', '.join(FLOAT_LAYERS)}"
        )
    if float_layers != "none":
        excluded += stem_and_classifier_nodes(model)
    if float_layers == "stem-stage1-classifier":
        excluded += stage1_nodes(model)
    extra_options: dict[str, object] = {}
    if method == "percentile":
        extra_options["CalibPercentile"] = PERCENTILE
    settings: dict[str, object] = {
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8 per-channel",
        "calibration_method": {
            "minmax": "MinMax",
            "percentile": f"Percentile ({PERCENTILE})",
            "entropy": "Entropy",
        }[method],
        "calibration_samples": len(calibration),
        "float_layers": float_layers,
        "float_nodes": excluded,
    }
    # The quantiser logs advice through the root logger; keep the progress output clean.
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(source),
                str(target),
                _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[method],
                nodes_to_exclude=excluded,
                extra_options=extra_options,
            )
    except Exception as exc:
        raise ExportError(f"INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.getLogger().setLevel(root_level)
    check_graph(target)
    return settings
