"""The served model as the Open Inference Protocol sees it, for both transports.

Metadata (inputs, outputs, versions) comes from the package's manifest. A request gives
exactly one input: either the model's own UINT8 `[N, H, W, 3]` pixels (already
preprocessed: straight to the batcher) or BYTES `[N]` / `[N, 1]` encoded images (decoded
and preprocessed here). The outputs are `logits` and `embedding` (FP32), or, with the
classification extension, the top k classes as `"score:index:label"` strings, the score
being the output's own value, as Triton's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.config import Settings
from service.errors import BadRequest, Draining, NotFound, NotReady, TooManyImages
from service.frontend.rest_api import service_version
from service.frontend.runtime import ImageResult, Runtime, State
from service.frontend.v2.tensors import BYTES, InferRequest, OutputTensor, RequestedOutput
from service.model_package import ModelPackage

SERVER_NAME = "resnet-serve"
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORM = "onnxruntime_onnx"
# The platform by the runtime that serves (Triton's names: its OpenVINO backend's is
# `openvino`, whatever format it reads).
PLATFORMS = {"onnxruntime": PLATFORM, "openvino": "openvino"}
ENCODED_INPUT = "image_bytes"  # BYTES: encoded images, decoded by the service
FP32 = "FP32"


@dataclass
class Plan:
    """A validated request: what to run and which outputs to return."""

    images: list[bytes] | np.ndarray
    outputs: list[RequestedOutput]

    @property
    def wanted(self) -> frozenset[str]:
        """The outputs to compute (the engine may leave the others out)."""
        return frozenset(output.name for output in self.outputs)


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": service_version(), "extensions": list(EXTENSIONS)}


class V2Model:
    """Checks requests against the served model and shapes its results."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings

    async def live(self) -> bool:
        return await self.runtime.live()

    @property
    def ready(self) -> bool:
        return self.runtime.state is State.READY

    def package(self, name: str, version: str = "") -> ModelPackage:
        """The package, if `name` (and `version`, when given) are the served ones: else
        404; 503 while loading."""
        package = self.runtime.package
        if package is None:
            state = self.runtime.state
            raise Draining() if state is State.DRAINING else NotReady()
        manifest = package.manifest
        if name != manifest.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{manifest.name}'")
        if version and version != manifest.version:
            raise NotFound(
                f"unknown version '{version}' of model '{name}'; served: '{manifest.version}'"
            )
        return package

    def model_ready(self, name: str, version: str = "") -> bool:
        """False while loading (the name cannot be checked yet); 404 for another model."""
        if self.runtime.package is None:
            return False
        self.package(name, version)
        return self.ready

    def _platform(self) -> str:
        served = self.runtime.served
        return PLATFORMS.get(served.runtime, PLATFORM) if served is not None else PLATFORM

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        manifest = self.package(name, version).manifest
        pixels = manifest.inputs[0]
        return {
            "name": manifest.name,
            "versions": [manifest.version],
            "platform": self._platform(),
            "inputs": [
                {"name": pixels.name, "datatype": "UINT8", "shape": [-1, *self._pixel_shape()]},
                {"name": ENCODED_INPUT, "datatype": BYTES, "shape": [-1]},
            ],
            "outputs": [
                {"name": output.name, "datatype": FP32, "shape": [-1, *output.shape[1:]]}
                for output in manifest.outputs
            ],
        }

    def _pixel_shape(self) -> list[int]:
        package = self.runtime.package
        assert package is not None
        crop = package.manifest.preprocessing.crop
        return [crop, crop, 3]

    # ------------------------------------------------------------ inference

    def plan(self, name: str, version: str, request: InferRequest) -> Plan:
        """Validate the request before any work (404 for the model, 400 for tensors)."""
        package = self.package(name, version)
        manifest = package.manifest
        pixels_name = manifest.inputs[0].name
        if len(request.inputs) != 1:
            raise BadRequest(
                f"send exactly one input, '{pixels_name}' (UINT8 pixels) or "
                f"'{ENCODED_INPUT}' (BYTES images); got {len(request.inputs)}"
            )
        tensor = request.inputs[0]
        if tensor.name == pixels_name:
            expected = ["N", *map(str, self._pixel_shape())]
            if tensor.datatype != "UINT8":
                raise BadRequest(f"input '{tensor.name}' must be UINT8; got {tensor.datatype}")
            if len(tensor.shape) != 4 or tensor.shape[1:] != self._pixel_shape():
                raise BadRequest(
                    f"input '{tensor.name}' must have shape [{', '.join(expected)}]; "
                    f"got {tensor.shape}"
                )
            assert isinstance(tensor.data, np.ndarray)
            images: list[bytes] | np.ndarray = tensor.data
        elif tensor.name == ENCODED_INPUT:
            if tensor.datatype != BYTES:
                raise BadRequest(f"input '{tensor.name}' must be BYTES; got {tensor.datatype}")
            if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
                raise BadRequest(
                    f"input '{tensor.name}' must have shape [N] or [N, 1]; got {tensor.shape}"
                )
            assert isinstance(tensor.data, list)
            images = tensor.data
        else:
            raise BadRequest(
                f"unknown input '{tensor.name}'; the inputs are '{pixels_name}' (UINT8) and "
                f"'{ENCODED_INPUT}' (BYTES)"
            )
        count = len(images)
        if count == 0:
            raise BadRequest(f"input '{tensor.name}' holds no images")
        if count > self.settings.max_images_per_request:
            raise TooManyImages(
                f"input '{tensor.name}' holds {count} images; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        return Plan(images, self._outputs(package, request))

    def _outputs(self, package: ModelPackage, request: InferRequest) -> list[RequestedOutput]:
        names = [output.name for output in package.manifest.outputs]
        wanted = request.outputs or [RequestedOutput(name) for name in names]
        for output in wanted:
            if output.name not in names:
                raise BadRequest(
                    f"unknown output '{output.name}'; the outputs are {', '.join(names)}"
                )
            if output.classification < 0:
                raise BadRequest(f"output '{output.name}': classification must be positive")
            if output.binary is None:
                output.binary = request.binary_outputs
        return wanted

    def render(self, plan: Plan, results: list[ImageResult]) -> list[OutputTensor]:
        package = self.runtime.package
        assert package is not None
        tensors = []
        for output in plan.outputs:
            rows = np.stack([r.logits if output.name == "logits" else r.embedding for r in results])
            binary = bool(output.binary)
            if output.classification:
                labels = package.labels if output.name == "logits" else None
                classes = classify(rows, output.classification, labels)
                shape = [len(classes), len(classes[0])]
                flat = [entry for row in classes for entry in row]
                tensors.append(OutputTensor(output.name, BYTES, shape, flat, binary))
            else:
                rows = rows.astype(np.float32, copy=False)
                tensors.append(OutputTensor(output.name, FP32, list(rows.shape), rows, binary))
        return tensors


def classify(rows: np.ndarray, k: int, labels: list[str] | None) -> list[list[bytes]]:
    """Triton's classification extension: per row, the k largest values, highest first
    (ties: lower index first), as `b"value:index:label"` (no label part without labels)."""
    k = min(k, rows.shape[1])
    out = []
    for row in rows:
        order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
        out.append(
            [
                f"{float(row[i]):f}:{int(i)}{':' + labels[i] if labels else ''}".encode()
                for i in order
            ]
        )
    return out
