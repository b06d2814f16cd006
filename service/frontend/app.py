"""`create_app(settings)`: the FastAPI application, assembled from its parts.

- `Runtime` (runtime.py): admission, header checks, decoding, draining, over an
  `EngineClient` (service/engine_api.py): the engine in this process (`LocalEngine`) or
  in its own (`RemoteEngine`, over the channel); nothing here knows which;
- `ImageRequests` (service/frontend/handling.py): the one path every image request takes;
- one module per protocol over them: `RestApi` (rest_api.py: /predict, /embed, probes),
  the Open Inference Protocol (KServe v2) over HTTP (v2/http_api.py: /v2) and, with
  `grpc_port` set, over gRPC (v2/grpc_api.py, in the same event loop);
- middleware: the request id for logs (service/observability/logs.py), optional API keys
  (security.py);
- exception handlers that keep every error in the one JSON shape.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.config import Settings
from service.engine_api import EngineClient
from service.errors import InvalidParameter, ServiceError, shown
from service.frontend.handling import ImageRequests
from service.frontend.openapi_docs import mount_offline_docs
from service.frontend.responses import error_response, json_response
from service.frontend.rest_api import RestApi, service_version
from service.frontend.runtime import Runtime
from service.frontend.security import ApiKeyMiddleware, ApiKeys, open_paths
from service.frontend.v2.http_api import V2HttpApi, is_v2_path, v2_error_response
from service.frontend.v2.model import V2Model
from service.observability import tracing
from service.observability.logs import RequestIdMiddleware
from service.observability.metrics import ServiceMetrics

log = logging.getLogger("resnet_serve")


EngineMaker = Callable[[ServiceMetrics], EngineClient]


def create_app(
    settings: Settings,
    *,
    engine_factory: Callable[..., Any] | None = None,
    engine: EngineMaker | None = None,
    announce: bool = True,
) -> FastAPI:
    """The app over `engine` (made with the app's metrics), or by default over the engine
    in this process, opened by `engine_factory` (`load_engine`, on the settings' runtime,
    unless a test gives its own). Only the in-process default imports a runtime.
    `announce`: whether this app logs server-wide warnings (one front-end of several
    does)."""
    metrics = ServiceMetrics()
    if engine is None:
        from service.engine.local import LocalEngine

        if engine_factory is None:
            client: EngineClient = LocalEngine(settings, metrics)
        else:
            client = LocalEngine(settings, metrics, engine_factory)
    else:
        client = engine(metrics)
    runtime = Runtime(settings, metrics, client)
    keys = ApiKeys([key.get_secret_value() for key in settings.api_keys], settings.api_keys_file)
    requests = ImageRequests(runtime, settings, metrics)
    v2_model = V2Model(runtime, settings)
    app = FastAPI(
        title="resnet-serve",
        version=service_version(),
        summary="ImageNet labels and embedding vectors from a ResNet, on ONNX Runtime.",
        lifespan=_lifespan(runtime, settings, _grpc_starter(v2_model, requests, keys, settings)),
        docs_url=None,  # served from local assets by mount_offline_docs: works offline
        redoc_url=None,
    )
    mount_offline_docs(app)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.grpc_port = None  # the bound port, once the gRPC server listens
    app.state.processes = {"workers": 0, "frontend_pid": os.getpid(), "engine": "this process"}
    # None when tracing is off
    app.state.tracing = tracing.instrument(app, service_version(), announce=announce)
    app.include_router(RestApi(runtime, settings, metrics, requests).router())
    app.include_router(V2HttpApi(v2_model, requests).router())
    add_error_handlers(app, metrics)
    if keys.enabled:

        def refuse(error: ServiceError, path: str) -> Response:
            metrics.rejections.labels("unauthorized").inc()
            return shaped_error(path, error)

        paths = open_paths(settings.api_key_for_probes, settings.api_key_for_metrics)
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=paths, on_refused=refuse)
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry the id too
    return app


def _grpc_starter(
    model: V2Model, requests: ImageRequests, keys: ApiKeys, settings: Settings
) -> Callable[[], Awaitable[tuple[Any, int]]]:
    """gRPC is imported only when it is served: without `--grpc-port` the service needs no
    grpcio at all, nor one as new as its committed stubs ask for."""

    async def start() -> tuple[Any, int]:
        from service.frontend.v2.grpc_api import V2GrpcServicer, start_grpc_server

        return await start_grpc_server(settings, V2GrpcServicer(model, requests, keys, settings))

    return start


def _lifespan(
    runtime: Runtime, settings: Settings, start_grpc: Callable[[], Awaitable[tuple[Any, int]]]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        await runtime.load()  # in the background: /healthz answers at once
        grpc_server = None
        if settings.grpc_port:
            grpc_server, app.state.grpc_port = await start_grpc()
        try:
            yield
        finally:
            if grpc_server is not None:  # drained with HTTP: calls in flight finish first
                from service.frontend.v2.grpc_api import stop_grpc_server

                await stop_grpc_server(
                    grpc_server, runtime.drain_time_left(settings.shutdown_grace_s)
                )
            await runtime.close(runtime.drain_time_left(settings.shutdown_grace_s))

    return lifespan


def shaped_error(path: str, error: ServiceError) -> Response:
    """The error in the shape of the protocol its path belongs to."""
    return v2_error_response(error) if is_v2_path(path) else error_response(error)


def add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Framework errors (validation, unknown route, anything unexpected) in our shape."""

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, error: ServiceError) -> Response:
        return shaped_error(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            + (f" (got {shown(item['input'])})" if "input" in item else "")
            for item in error.errors()[:5]
        )
        metrics.rejections.labels("bad_input").inc()
        return shaped_error(request.url.path, InvalidParameter(details or "invalid parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        if is_v2_path(request.url.path):
            return json_response(
                {"error": error.detail}, error.status_code, dict(error.headers or {})
            )
        codes = {404: "not_found", 405: "method_not_allowed"}
        body = {
            "error": {"code": codes.get(error.status_code, "http_error"), "message": error.detail}
        }
        return json_response(body, error.status_code, dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        metrics.rejections.labels("internal").inc()
        return shaped_error(request.url.path, ServiceError())
