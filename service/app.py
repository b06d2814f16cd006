"""The HTTP layer: routes, request parsing, error mapping. `create_app(settings)` builds it.

Inference work happens in `Runtime`; this module turns requests into calls on it and
its results and errors into responses. Every error is `{"error": {"code", "message"}}`.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from importlib import metadata
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from service import postprocess
from service.config import Settings
from service.errors import (
    ClientClosedRequest,
    Draining,
    InvalidParameter,
    NotReady,
    ServiceError,
)
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.openapi_docs import mount_offline_docs
from service.payloads import parse_payload, read_body
from service.runtime import (
    EngineFactory,
    ImageResult,
    Runtime,
    State,
    error_reason,
    load_onnx_engine,
)
from service.schemas import (
    ERROR_RESPONSES,
    EmbedResponse,
    PredictResponse,
    image_request_body,
)

log = logging.getLogger("resnet_serve")
T = TypeVar("T")
JSON = "application/json"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def service_version() -> str:
    try:
        return metadata.version("resnet-serve")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, headers=headers, media_type=JSON)


def error_response(error: ServiceError) -> Response:
    headers = dict(error.headers)
    if isinstance(error, Draining):
        headers["Connection"] = "close"  # send the client's next request to another replica
    return json_response(error.body(), error.status, headers)


async def _wait_for_disconnect(receive: Callable[[], Awaitable[Message]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client goes away first (its queued images are then
    skipped before they reach the engine)."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        work_task.cancel()
        with suppress(asyncio.CancelledError, ServiceError):
            await work_task
        raise ClientClosedRequest()
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()


def _bool_param(name: str, value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidParameter(f"{name} must be true or false, not {value!r}")


def _int_param(name: str, value: object, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be an integer")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError as exc:
        raise InvalidParameter(f"{name} must be an integer, not {value!r}") from exc
    if not low <= number <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}, got {number}")
    return number


def _choice_param(name: str, value: object, default: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return default
    if value not in choices:
        raise InvalidParameter(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _server_timing(results: list[ImageResult], total_s: float) -> str:
    """Where the request's time went, in ms: the slowest image's decode, queue wait and
    engine run, and the whole request in the app (everything but the network)."""
    decode = max(r.decode_s for r in results) * 1000
    queued = max(r.queued_s for r in results) * 1000
    run = max(r.infer_s for r in results) * 1000
    batch = max(r.batch_size for r in results)
    return (
        f"decode;dur={decode:.2f}, queue;dur={queued:.2f}, "
        f'infer;dur={run:.2f};desc="batch {batch}", app;dur={total_s * 1000:.2f}'
    )


def create_app(settings: Settings, *, engine_factory: EngineFactory = load_onnx_engine) -> FastAPI:
    metrics = ServiceMetrics()
    runtime = Runtime(settings, metrics, engine_factory)

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
            await runtime.close(settings.shutdown_grace_s)

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
    allowed_fields = {"top_k", "normalize", "encoding"}

    def model_ref() -> dict[str, Any]:
        assert runtime.package is not None
        assert runtime.served is not None
        manifest = runtime.package.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "precision": str(runtime.served.precision),
            "trained": manifest.trained,
        }

    async def serve_images(
        request: Request,
        endpoint: str,
        render: Callable[[list[ImageResult], dict[str, object]], Response],
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            runtime.admit()  # refuse before reading a body we would not use
            body = await read_body(
                request.stream(), request.headers.get("content-length"), settings.max_body_bytes
            )
            payload = parse_payload(
                request.headers.get("content-type"), body, settings.max_images_per_request
            )
            unknown = set(payload.fields) - allowed_fields
            if unknown:
                raise InvalidParameter(f"unknown field(s): {', '.join(sorted(unknown))}")
            params = {**dict(request.query_params), **payload.fields}
            timeout_s = settings.request_timeout_ms / 1000
            results = await until_disconnected(request, runtime.infer(payload.images, timeout_s))
            response = render(results, params)
            response.headers["Server-Timing"] = _server_timing(
                results, time.perf_counter() - started
            )
            metrics.images.labels(endpoint).inc(len(results))
            status = response.status_code
            return response
        except ServiceError as error:
            status = error.status
            metrics.rejections.labels(error_reason(error)).inc()
            return error_response(error)
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)

    def render_predictions(results: list[ImageResult], params: dict[str, object]) -> Response:
        package = runtime.package
        assert package is not None
        k = _int_param(
            "top_k", params.get("top_k"), settings.default_top_k, 1, package.manifest.num_classes
        )
        body = {
            "model": model_ref(),
            "predictions": [postprocess.top_k(r.logits, k, package.labels) for r in results],
        }
        return json_response(body)

    def render_embeddings(results: list[ImageResult], params: dict[str, object]) -> Response:
        normalize = _bool_param("normalize", params.get("normalize"), True)
        encoding = _choice_param("encoding", params.get("encoding"), "json", ("json", "base64"))
        vectors = [postprocess.embedding(r.embedding, normalize) for r in results]
        embeddings: list[Any] = (
            [postprocess.to_base64(v) for v in vectors] if encoding == "base64" else vectors
        )
        body = {
            "model": model_ref(),
            "embeddings": embeddings,
            "dim": int(vectors[0].shape[0]),
            "normalized": normalize,
            "encoding": encoding,
        }
        return json_response(body)

    top_k_field = {"top_k": {"type": "integer", "minimum": 1, "default": settings.default_top_k}}
    embed_fields = {
        "normalize": {"type": "boolean", "default": True},
        "encoding": {"type": "string", "enum": ["json", "base64"], "default": "json"},
    }

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=image_request_body(top_k_field, {"top_k": 3}),
        summary="Top-k ImageNet labels for one or more images",
    )
    async def predict(
        request: Request,
        top_k: Annotated[
            int | None,
            Query(ge=1, description=f"labels per image (default {settings.default_top_k})"),
        ] = None,
    ) -> Response:
        return await serve_images(request, "predict", render_predictions)

    @app.post(
        "/embed",
        response_model=EmbedResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=image_request_body(embed_fields, {"normalize": True}),
        summary="Embedding vectors (pooled features before the classifier) for images",
    )
    async def embed(
        request: Request,
        normalize: Annotated[bool | None, Query(description="L2-normalise (default true)")] = None,
        encoding: Annotated[
            Literal["json", "base64"] | None,
            Query(description="json: lists of floats; base64: little-endian float32 bytes"),
        ] = None,
    ) -> Response:
        return await serve_images(request, "embed", render_embeddings)

    @app.get("/healthz", summary="Liveness: the process is up (503 only if loading failed)")
    async def healthz() -> Response:
        if runtime.state is State.FAILED:
            return error_response(NotReady(f"the model failed to load: {runtime.failure}"))
        return json_response({"status": "ok"})

    @app.get("/readyz", summary="Readiness: 200 once the model is loaded and warm")
    async def readyz() -> Response:
        if runtime.state is State.READY:
            return json_response({"status": "ready"})
        if runtime.state is State.DRAINING:
            return error_response(Draining())
        message = (
            f"the model failed to load: {runtime.failure}"
            if runtime.state is State.FAILED
            else NotReady.message
        )
        return error_response(NotReady(message))

    @app.get("/info", summary="What is being served: model, precision, provider, batching")
    async def info() -> Response:
        return json_response(describe(runtime, settings))

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(ServiceError)
    async def on_service_error(_request: Request, error: ServiceError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError) -> Response:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
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

    return app


def describe(runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """The body of /info."""
    info: dict[str, Any] = {"state": str(runtime.state), "service_version": service_version()}
    if runtime.failure:
        info["error"] = runtime.failure
    package = runtime.package
    if package is not None:
        manifest = package.manifest
        info["model"] = {
            "name": manifest.name,
            "version": manifest.version,
            "arch": manifest.arch,
            "trained": manifest.trained,
            "source": manifest.source.model_dump(exclude_none=True),
            "num_classes": manifest.num_classes,
            "embedding_dim": manifest.embedding_dim,
            "created_at": manifest.created_at,
            "variants": sorted(manifest.variants),
            "directory": str(package.directory),
        }
        if not manifest.trained:
            info["model"]["warning"] = (
                "UNTRAINED: random weights (seed "
                f"{manifest.source.seed}); labels and scores are meaningless"
            )
        info["preprocessing"] = manifest.preprocessing.model_dump()
    served = runtime.served
    if served is not None:
        serving: dict[str, Any] = {
            "precision": str(served.precision),
            "requested_precision": str(settings.precision),
            "execution_providers": served.providers,
            "device": served.device,
            "warnings": served.warnings,
        }
        if package is not None:
            variant = package.manifest.variants[served.precision]
            serving["file"] = variant.file
            serving["verified"] = variant.verification.passed
            serving["verified_against"] = variant.verification.reference
        info["serving"] = serving
    info["batching"] = {
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_ms": settings.max_queue_delay_ms,
        "max_queue_size": settings.max_queue_size,
        "max_concurrent_batches": settings.max_concurrent_batches,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    info["limits"] = {
        "max_images_per_request": settings.max_images_per_request,
        "max_body_bytes": settings.max_body_bytes,
        "max_image_pixels": settings.max_image_pixels,
    }
    return info
