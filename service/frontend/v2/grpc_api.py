"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`.

Served by grpcio's asyncio server in the process and event loop of the HTTP server, on
its own port (`--grpc-port`), over the same runtime and batcher, and through the same
request handling (`ImageRequests`: admission, body budget, deadline, metrics). The
client's gRPC deadline becomes the request's deadline (capped by `request_timeout_ms`).
Draining refuses new calls with UNAVAILABLE while accepted ones finish; the server stops
with the HTTP side. Messages may be as large as `--max-body-bytes` (gRPC's 4 MB default
would refuse a batch of 32 photos), and connections are recycled after
`MAX_CONNECTION_AGE_S` so that long-lived clients rebalance across replicas.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import grpc
import numpy as np

from service.config import Settings
from service.errors import BadRequest, ServiceError, TooBusy, Unauthorized
from service.frontend.handling import ImageRequests
from service.frontend.limits import Lease
from service.frontend.security import ApiKeys
from service.frontend.v2.model import V2Model, server_metadata
from service.frontend.v2.proto import grpc_predict_v2_pb2 as pb
from service.frontend.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.frontend.v2.tensors import (
    BYTES,
    NUMERIC,
    InferRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    check_tensor_header,
    element_count,
    tensor_from_raw,
)

log = logging.getLogger("resnet_serve")
ENDPOINT = "v2_grpc"  # the `endpoint` label of the request metrics
MAX_CONNECTION_AGE_S = 300  # then the client reconnects, possibly to another replica
MAX_CONNECTION_AGE_GRACE_S = 30  # for calls in flight on a connection being recycled
KEEPALIVE_S = 60  # server pings idle connections, so dead peers are found and dropped

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Where each numeric datatype's values sit in `InferTensorContents`.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    code = STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)
    await context.abort(code, error.message)
    raise AssertionError("unreachable: abort raises")


class V2GrpcServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, model: V2Model, requests: ImageRequests, keys: ApiKeys, settings: Settings
    ) -> None:
        self.model = model
        self.requests = requests
        self.keys = keys
        self.settings = settings

    async def _authorize(self, context: grpc.aio.ServicerContext, probe: bool = False) -> None:
        """API keys, when configured, in the `authorization` metadata (`Bearer <key>`)."""
        if not self.keys.enabled or (probe and not self.settings.api_key_for_probes):
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if self.keys.accepts(token.strip().encode()):
                return
            error = Unauthorized("the API key is not valid")
        else:
            error = Unauthorized("a valid API key is required: send 'authorization: Bearer <key>'")
        self.requests.metrics.rejections.labels("unauthorized").inc()
        await abort(context, error)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context, probe=True)
        return pb.ServerLiveResponse(live=await self.model.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context, probe=True)
        return pb.ServerReadyResponse(ready=self.model.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context, probe=True)
        try:
            return pb.ModelReadyResponse(
                ready=self.model.model_ready(request.name, request.version)
            )
        except ServiceError as error:
            await abort(context, error)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        try:
            meta = self.model.metadata(request.name, request.version)
        except ServiceError as error:
            await abort(context, error)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**entry) for entry in meta["inputs"]],
            outputs=[tensor(**entry) for entry in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        lease = Lease(self.requests.body_budget)
        try:
            async with self.requests.counted(ENDPOINT) as tally:
                name, version = request.model_name, request.model_version
                package = self.model.package(name, version)
                self.requests.runtime.admit()
                if not lease.grow_to(request.ByteSize()):
                    raise TooBusy()
                plan = self.model.plan(name, version, from_proto(request))
                timeout_s = self.settings.request_timeout_ms / 1000
                remaining = context.time_remaining()
                if remaining is not None:
                    timeout_s = max(0.0, min(timeout_s, remaining))
                results = await self.requests.run_within(
                    plan.images, timeout_s, outputs=plan.wanted
                )
                outputs = self.model.render(plan, results)
                response = to_proto(name, package.manifest.version, request.id, outputs)
                tally.status, tally.images = 200, len(results)
        except ServiceError as error:
            await abort(context, error)
        finally:
            lease.release()
        return response


def from_proto(request: Any) -> InferRequest:
    """The protocol-neutral request: tensors from `raw_input_contents` when sent (one
    entry per input, in order), else from each input's typed `contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = check_tensor_header(
            tensor.name, tensor.datatype, list(tensor.shape)
        )
        if raw:
            inputs.append(tensor_from_raw(name, datatype, shape, raw[index]))
        else:
            inputs.append(_from_contents(name, datatype, shape, tensor.contents))
    outputs = [
        RequestedOutput(
            output.name,
            classification=int(output.parameters["classification"].int64_param)
            if "classification" in output.parameters
            else 0,
        )
        for output in request.outputs
    ]
    return InferRequest(inputs=inputs, outputs=outputs, id=request.id)


def _from_contents(name: str, datatype: str, shape: list[int], contents: Any) -> InputTensor:
    count = element_count(shape)
    if datatype == BYTES:
        values: Any = list(contents.bytes_contents)
    elif datatype in CONTENTS_FIELD:
        values = getattr(contents, CONTENTS_FIELD[datatype])
    else:
        raise BadRequest(f"input '{name}': send {datatype} data in raw_input_contents")
    if len(values) != count:
        raise BadRequest(
            f"input '{name}': shape {shape} holds {count} element(s); the contents have "
            f"{len(values)}"
        )
    if datatype == BYTES:
        return InputTensor(name, datatype, shape, values)
    dtype = NUMERIC[datatype]
    array = np.asarray(values)
    if (
        dtype.kind in "ui"
        and array.size
        and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max)
    ):
        raise BadRequest(f"input '{name}': a value lies outside the range of {datatype}")
    return InputTensor(name, datatype, shape, array.astype(dtype).reshape(shape))


def to_proto(name: str, version: str, request_id: str, outputs: list[OutputTensor]) -> Any:
    """The response with every output's data in `raw_output_contents`, as Triton sends it."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(
    settings: Settings, servicer: V2GrpcServicer
) -> tuple[grpc.aio.Server, int]:
    """Start serving on `settings.grpc_port` in the running event loop; returns the
    server and the port it bound."""
    limit = settings.max_body_bytes + 64 * 1024  # the message's framing beyond the images
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_S * 1000),
            ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(_address(settings.host, settings.grpc_port))
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", _address(settings.host, port))
    return server, port


async def stop_grpc_server(server: grpc.aio.Server, grace_s: float) -> None:
    """Stop taking calls; calls in flight get `grace_s` to finish."""
    started = time.monotonic()
    await server.stop(grace_s)
    log.info("gRPC server stopped in %.1f s", time.monotonic() - started)
