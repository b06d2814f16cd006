"""The Open Inference Protocol (KServe v2) over HTTP: the `/v2` routes.

Requests take the one path every image request takes (`ImageRequests`: admission, body
budget, deadline, disconnects, metrics); only the wire format is this module's: JSON
tensors, and the binary tensor data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor's raw bytes in order).
Every error is `{"error": "<message>"}`, with the status Triton uses.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.errors import BadRequest, Draining, NotReady, ServiceError, shown
from service.frontend.handling import ImageRequests, server_timing
from service.frontend.limits import Lease
from service.frontend.responses import json_response
from service.frontend.runtime import State
from service.frontend.v2.model import V2Model, server_metadata
from service.frontend.v2.tensors import (
    InferRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    check_tensor_header,
    tensor_from_json,
    tensor_from_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
PREFIX = "/v2"
ENDPOINT = "v2_http"  # the `endpoint` label of the request metrics


def is_v2_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def v2_error_response(error: ServiceError) -> Response:
    """The protocol's error shape, `{"error": "<message>"}`, with the error's status."""
    headers = dict(error.headers)
    if isinstance(error, Draining):
        headers["Connection"] = "close"
    return json_response({"error": error.message}, error.status, headers)


class V2Error(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": V2Error, "description": ERROR_MEANINGS[status]} for status in statuses
    }


ERROR_MEANINGS = {
    400: "malformed request: the message names the tensor (input name, datatype, shape, data)",
    401: "API key missing or not valid (when keys are configured)",
    404: "unknown model or version",
    408: "the request body was not received in time",
    413: "body, image count or pixel count too large",
    429: "queue full, or too much request data in flight; retry after Retry-After",
    503: "model not ready, or the server is draining",
    504: "the request's deadline passed",
}
MODEL_ERRORS = _errors(401, 404, 503)
INFER_ERRORS = _errors(400, 401, 404, 408, 413, 429, 503, 504)
INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "outputs as JSON, or with any binary output a JSON header of "
        f"{HEADER_LENGTH} bytes followed by the binary tensors",
        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
    }
}


class V2HttpApi:
    """Route handlers for `/v2`; `router()` registers them."""

    def __init__(self, model: V2Model, requests: ImageRequests) -> None:
        self.model = model
        self.requests = requests

    def router(self) -> APIRouter:
        router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol (KServe v2)"])
        get = ["GET"]
        router.add_api_route(
            "", self.server_metadata, methods=get, summary="Server metadata", responses=_errors(401)
        )
        for path, handler, summary in (
            ("/health/live", self.live, "Server liveness"),
            ("/health/ready", self.ready, "Server readiness"),
        ):
            router.add_api_route(
                path, handler, methods=get, summary=summary, responses=_errors(401, 503)
            )
        for base in ("/models/{model_name}", "/models/{model_name}/versions/{model_version}"):
            router.add_api_route(
                base, self.metadata, methods=get, summary="Model metadata", responses=MODEL_ERRORS
            )
            router.add_api_route(
                base + "/ready",
                self.model_ready,
                methods=get,
                summary="Model readiness",
                responses=MODEL_ERRORS,
            )
            router.add_api_route(
                base + "/infer",
                self.infer,
                methods=["POST"],
                summary="Inference: UINT8 pixels or BYTES images in; logits, embedding out",
                responses={**INFER_OK, **INFER_ERRORS},
                openapi_extra=INFER_DOCS,
            )
        return router

    async def server_metadata(self) -> Response:
        return json_response(server_metadata())

    async def live(self) -> Response:
        if not await self.model.live():
            return v2_error_response(NotReady("the model failed to load or the engine stopped"))
        return json_response({"live": True})

    async def ready(self) -> Response:
        if self.model.ready:
            return json_response({"ready": True})
        draining = self.model.runtime.state is State.DRAINING
        return v2_error_response(Draining() if draining else NotReady())

    async def metadata(self, model_name: str, model_version: str = "") -> Response:
        try:
            return json_response(self.model.metadata(model_name, model_version))
        except ServiceError as error:
            return v2_error_response(error)

    async def model_ready(self, model_name: str, model_version: str = "") -> Response:
        try:
            if self.model.model_ready(model_name, model_version):
                return json_response({"name": model_name, "ready": True})
            return v2_error_response(NotReady())
        except ServiceError as error:
            return v2_error_response(error)

    async def infer(self, request: Request, model_name: str, model_version: str = "") -> Response:
        started = time.perf_counter()
        lease = Lease(self.requests.body_budget)
        try:
            async with self.requests.counted(ENDPOINT) as tally:
                package = self.model.package(model_name, model_version)  # 404 first
                self.requests.runtime.admit()
                body = await self.requests.read_body(request, lease)
                parsed = parse_request(body, request.headers.get(HEADER_LENGTH))
                plan = self.model.plan(model_name, model_version, parsed)
                results = await self.requests.run(plan.images, request, plan.wanted)
                outputs = self.model.render(plan, results)
                version = package.manifest.version
                response = render_response(model_name, version, parsed.id, outputs)
                response.headers["Server-Timing"] = server_timing(
                    results, time.perf_counter() - started
                )
                tally.status, tally.images = response.status_code, len(results)
                return response
        except ServiceError as error:
            return v2_error_response(error)
        finally:
            lease.release()


# ---------------------------------------------------------------- the wire format


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request from its body: JSON, or with the binary extension a JSON
    header of `header_length` bytes followed by the binary tensors."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError as exc:
            raise BadRequest(f"{HEADER_LENGTH} is not a number: {shown(header_length)}") from exc
        if not 0 < length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {length}, outside the body of {len(body)} bytes")
        body, binary = body[:length], body[length:]
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequest("the request must be a JSON object")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the request needs 'inputs': a non-empty list of tensors")
    tensors = []
    offset = 0
    for entry in inputs:
        tensor, used = _input(entry, binary, offset)
        tensors.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"the binary data is {len(binary)} bytes; the inputs' binary_data_size add up "
            f"to {offset}"
        )
    parameters = _parameters(document.get("parameters"), "the request")
    request_id = document.get("id", "")
    return InferRequest(
        inputs=tensors,
        outputs=_requested_outputs(document.get("outputs")),
        id=request_id if isinstance(request_id, str) else str(request_id),
        binary_outputs=parameters.get("binary_data_output") is True,
    )


def _input(entry: object, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(entry, dict):
        raise BadRequest(f"each input must be a JSON object; got {shown(entry)}")
    name, datatype, shape = check_tensor_header(
        entry.get("name"), entry.get("datatype"), entry.get("shape")
    )
    parameters = _parameters(entry.get("parameters"), f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        return tensor_from_json(name, datatype, shape, entry["data"]), 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise BadRequest(
            f"input '{name}': binary_data_size {size} runs past the end of the binary data"
        )
    return tensor_from_raw(name, datatype, shape, binary[offset : offset + size]), size


def _parameters(value: object, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{owner}: 'parameters' must be a JSON object")
    return value


def _requested_outputs(value: object) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list")
    outputs = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"each requested output needs a 'name'; got {shown(entry)}")
        name = entry["name"]
        parameters = _parameters(entry.get("parameters"), f"output '{name}'")
        binary = parameters.get("binary_data")
        classes = parameters.get("classification", 0)
        if not isinstance(classes, int) or isinstance(classes, bool):
            raise BadRequest(f"output '{name}': classification must be an integer")
        outputs.append(RequestedOutput(name, binary if isinstance(binary, bool) else None, classes))
    return outputs


def render_response(
    model_name: str, model_version: str, request_id: str, outputs: list[OutputTensor]
) -> Response:
    """JSON, or with any binary output the JSON header then the binary tensors."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        if output.binary:
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(output.data, list):
            entry["data"] = [element.decode("utf-8", "replace") for element in output.data]
        else:
            entry["data"] = output.data.reshape(-1)
        described.append(entry)
    document: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": described,
    }
    if request_id:
        document["id"] = request_id
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "One input: the model's UINT8 pixels [N, H, W, 3] (already preprocessed) or "
            "'image_bytes', BYTES [N] of encoded images (base64 strings in JSON). With the "
            f"binary tensor data extension, the JSON header is {HEADER_LENGTH} bytes long "
            "and each input's raw bytes follow it (parameters.binary_data_size)."
        ),
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["inputs"]},
                "example": {
                    "inputs": [
                        {
                            "name": "image_bytes",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": ["<base64 JPEG>"],
                        }
                    ],
                    "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
                },
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
