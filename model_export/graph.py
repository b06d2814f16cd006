"""The serving graph: uint8 NHWC pixels in, `logits` and `embedding` out, one ONNX file.

Normalisation lives inside the graph so clients (and the host-to-GPU copy) move one byte
per channel instead of four, and no client can get the mean/std wrong.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import onnx
import torch
from torch import nn

from model_export.errors import ExportError
from model_export.sources import LoadedModel
from service.model_package import PreprocessSpec, TensorSpec

INPUT_NAME = "images"
LOGITS = "logits"
EMBEDDING = "embedding"
BATCH_DIM = "batch"
DEFAULT_OPSET = 18


class FusedPreprocess(nn.Module):
    """uint8 RGB [N, H, W, 3] → float [N, 3, H, W], as torchvision's ToTensor + Normalize.

    `(x / 255 - mean) / std` is folded into one multiply and one add per channel.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32)
        return pixels * self.scale + self.shift


class ServingResNet(nn.Module):
    """The exported network: fused preprocessing, the backbone, global average pooling,
    and the classifier; returns both the logits and the pooled embedding."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        spec = loaded.preprocessing
        self.preprocess = FusedPreprocess(spec.mean, spec.std)
        self.features = loaded.features
        self.classifier = loaded.classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.features(self.preprocess(images))
        # A mean over H and W is the adaptive average pool + flatten of torchvision and
        # transformers, and exports as one ReduceMean instead of a pool and a reshape.
        embedding = feature_map.mean(dim=(2, 3))
        return self.classifier(embedding), embedding


def export_onnx(module: nn.Module, path: Path, crop: int, opset: int = DEFAULT_OPSET) -> None:
    """Export with a dynamic batch axis through torch.export, then run the ONNX checker."""
    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                module.eval(),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[LOGITS, EMBEDDING],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    check_graph(path)


def check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from exc


def graph_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def io_specs(
    spec: PreprocessSpec, num_classes: int, embedding_dim: int
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(name=INPUT_NAME, dtype="uint8", shape=[BATCH_DIM, spec.crop, spec.crop, 3])
    ]
    outputs = [
        TensorSpec(name=LOGITS, dtype="float32", shape=[BATCH_DIM, num_classes]),
        TensorSpec(name=EMBEDDING, dtype="float32", shape=[BATCH_DIM, embedding_dim]),
    ]
    return inputs, outputs
