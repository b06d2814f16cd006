"""The cheap-engine package: a valid model package whose graph costs microseconds.

Same contract as a ResNet-50 package (uint8 `[N, 224, 224, 3]` in, `logits [N, 1000]` and
`embedding [N, 2048]` out, ImageNet preprocessing, a manifest `ModelPackage.load` accepts),
but the graph only averages a 14 x 14 grid of pixels and multiplies the three means by two
small matrices. Served, nearly all of a request's cost is then the server's own (HTTP,
decoding, queueing, copies), which is what `loadtests.overhead` measures, as Triton
measures its own overhead with identity models. Its manifest says plainly that it is
untrained and unverified: it is a measuring instrument, not a model.

    python -m loadtests.cheap_package --out models/cheap
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.model_package import (
    LABELS_FILE,
    MANIFEST_FILE,
    Manifest,
    Precision,
    PreprocessSpec,
    Source,
    TensorSpec,
    Variant,
    Verification,
)

INPUT_NAME = "images"
NUM_CLASSES = 1000
EMBEDDING_DIM = 2048
CROP = 224
GRID_STEP = 16  # every 16th pixel of each row and column: a 14 x 14 grid
OPSET = 18


def cheap_graph(
    num_classes: int = NUM_CLASSES, embedding_dim: int = EMBEDDING_DIM
) -> onnx.ModelProto:
    """pixels → a strided grid → per-channel means [N, 3] → two MatMuls."""
    rng = np.random.default_rng(0)
    to_embedding = rng.standard_normal((3, embedding_dim)).astype(np.float32) / 255.0
    to_logits = rng.standard_normal((3, num_classes)).astype(np.float32) / 255.0
    initializers = [
        numpy_helper.from_array(np.array([0, 0], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([CROP, CROP], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([GRID_STEP, GRID_STEP], dtype=np.int64), "steps"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "mean_axes"),
        numpy_helper.from_array(to_embedding, "to_embedding"),
        numpy_helper.from_array(to_logits, "to_logits"),
    ]
    nodes = [
        helper.make_node("Slice", [INPUT_NAME, "starts", "ends", "axes", "steps"], ["grid"]),
        helper.make_node("Cast", ["grid"], ["grid_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["grid_f", "mean_axes"], ["means"], keepdims=0),
        helper.make_node("MatMul", ["means", "to_embedding"], ["embedding"]),
        helper.make_node("MatMul", ["means", "to_logits"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cheap_engine",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", CROP, CROP, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_cheap_package(out: Path) -> Path:
    """Write the package to `out` (replacing a previous cheap package there)."""
    out.mkdir(parents=True, exist_ok=True)
    graph_file = out / "model.onnx"
    graph_file.write_bytes(cheap_graph().SerializeToString())
    data = graph_file.read_bytes()
    unverified = Verification(
        reference="none: a synthetic graph for measuring the server's own overhead",
        tolerances={},
        checks=[],
        passed=False,
    )
    manifest = Manifest(
        name="cheap-engine",
        version="1",
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        arch="cheap-engine",
        trained=False,
        source=Source(kind="random-init", seed=0),
        num_classes=NUM_CLASSES,
        embedding_dim=EMBEDDING_DIM,
        opset=OPSET,
        inputs=[TensorSpec(name=INPUT_NAME, dtype="uint8", shape=["batch", CROP, CROP, 3])],
        outputs=[
            TensorSpec(name="logits", dtype="float32", shape=["batch", NUM_CLASSES]),
            TensorSpec(name="embedding", dtype="float32", shape=["batch", EMBEDDING_DIM]),
        ],
        preprocessing=PreprocessSpec(),
        variants={
            Precision.FP32: Variant(
                precision=Precision.FP32,
                file=graph_file.name,
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
                verification=unverified,
                notes=["cheap-engine benchmark graph: a strided pixel mean and two MatMuls"],
            )
        },
        tools={"onnx": onnx.__version__},
    )
    labels = [f"class {index}" for index in range(NUM_CLASSES)]
    (out / LABELS_FILE).write_text(json.dumps(labels) + "\n")
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.cheap_package", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/cheap"))
    args = parser.parse_args(argv)
    print(f"cheap-engine package written to {write_cheap_package(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
