"""`create_app(settings)`: the FastAPI application, assembled from its parts.

- `Runtime` (service/runtime.py): model loading, decoding, batching, draining;
- `ImageRequests` (service/handling.py): the one path every image request takes;
- `RestApi` (service/rest_api.py): the routes;
- middleware: the request id for logs (service/logs.py), optional API keys
  (service/security.py);
- exception handlers that keep every error in the one JSON shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import tracing
from service.config import Settings
from service.errors import InvalidParameter, ServiceError
from service.handling import ImageRequests
from service.logs import RequestIdMiddleware
from service.metrics import ServiceMetrics
from service.openapi_docs import mount_offline_docs
from service.params import shown
from service.responses import error_response, json_response
from service.rest_api import RestApi, service_version
from service.runtime import EngineFactory, Runtime, load_onnx_engine
from service.security import ApiKeyMiddleware, ApiKeys, open_paths

log = logging.getLogger("resnet_serve")


def create_app(settings: Settings, *, engine_factory: EngineFactory = load_onnx_engine) -> FastAPI:
    metrics = ServiceMetrics()
    runtime = Runtime(settings, metrics, engine_factory)
    keys = ApiKeys([key.get_secret_value() for key in settings.api_keys], settings.api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers at once, /readyz turns 200 when warm.
        loading = asyncio.create_task(runtime.load(), name="load-model")
        app.state.loading = loading
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await runtime.close(runtime.drain_time_left(settings.shutdown_grace_s))

    app = FastAPI(
        title="resnet-serve",
        version=service_version(),
        summary="ImageNet labels and embedding vectors from a ResNet, on ONNX Runtime.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by mount_offline_docs: works offline
        redoc_url=None,
    )
    mount_offline_docs(app)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.tracing = tracing.instrument(app, service_version())  # None when tracing is off
    api = RestApi(runtime, settings, metrics, ImageRequests(runtime, settings, metrics))
    app.include_router(api.router())
    add_error_handlers(app, metrics)
    if keys.enabled:

        def refuse(error: ServiceError) -> Response:
            metrics.rejections.labels("unauthorized").inc()
            return error_response(error)

        paths = open_paths(settings.api_key_for_probes, settings.api_key_for_metrics)
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=paths, on_refused=refuse)
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry the id too
    return app


def add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Framework errors (validation, unknown route, anything unexpected) in our shape."""

    @app.exception_handler(ServiceError)
    async def on_service_error(_request: Request, error: ServiceError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError) -> Response:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            + (f" (got {shown(item['input'])})" if "input" in item else "")
            for item in error.errors()[:5]
        )
        metrics.rejections.labels("bad_input").inc()
        return error_response(InvalidParameter(details or "invalid parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        body = {
            "error": {"code": codes.get(error.status_code, "http_error"), "message": error.detail}
        }
        return json_response(body, error.status_code, dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        metrics.rejections.labels("internal").inc()
        return error_response(ServiceError())
