"""The service's own REST API: `/predict`, `/embed`, probes, `/info` and `/metrics`."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response

from service.config import Settings
from service.engine_api import EMBEDDING, LOGITS
from service.errors import Draining, EngineUnavailable, NotReady
from service.frontend.handling import ImageRequests
from service.frontend.params import EmbedParams, PredictParams, embed_params, predict_params
from service.frontend.responses import error_response, json_response
from service.frontend.runtime import ImageResult, Runtime, State
from service.frontend.schemas import (
    ERROR_RESPONSES,
    EmbedResponse,
    PredictResponse,
    image_request_body,
)
from service.images import postprocess
from service.observability import aggregate
from service.observability.metrics import ServiceMetrics

PREDICT_FIELDS = frozenset({"top_k"})
EMBED_FIELDS = frozenset({"normalize", "encoding"})
LOAD_FAILED = "the model failed to load; the server log says why"


def service_version() -> str:
    try:
        return metadata.version("resnet-serve")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class RestApi:
    """Route handlers over one runtime; `router()` registers them."""

    def __init__(
        self,
        runtime: Runtime,
        settings: Settings,
        metrics: ServiceMetrics,
        requests: ImageRequests,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.requests = requests

    def router(self) -> APIRouter:
        router = APIRouter()
        top_k_field = {
            "top_k": {"type": "integer", "minimum": 1, "default": self.settings.default_top_k}
        }
        embed_fields = {
            "normalize": {"type": "boolean", "default": True},
            "encoding": {"type": "string", "enum": ["json", "base64"], "default": "json"},
        }
        router.add_api_route(
            "/predict",
            self.predict,
            methods=["POST"],
            response_model=PredictResponse,
            responses=ERROR_RESPONSES,
            openapi_extra=image_request_body(top_k_field, {"top_k": 3}),
            summary="Top-k ImageNet labels for one or more images",
        )
        router.add_api_route(
            "/embed",
            self.embed,
            methods=["POST"],
            response_model=EmbedResponse,
            responses=ERROR_RESPONSES,
            openapi_extra=image_request_body(embed_fields, {"normalize": True}),
            summary="Embedding vectors (pooled features before the classifier) for images",
        )
        for path, handler, summary in (
            ("/healthz", self.healthz, "Liveness: the process is up (503 only if loading failed)"),
            ("/readyz", self.readyz, "Readiness: 200 once the model is loaded and warm"),
            ("/info", self.info, "What is being served: model, precision, provider, batching"),
        ):
            router.add_api_route(path, handler, methods=["GET"], summary=summary)
        if self.settings.metrics_port is None:  # else on its own port (cli.py)
            router.add_api_route(
                "/metrics",
                self.prometheus_metrics,
                methods=["GET"],
                summary="Prometheus metrics",
                response_class=PlainTextResponse,  # Prometheus text (or OpenMetrics), not JSON
            )
        return router

    # ------------------------------------------------------------ inference

    async def predict(
        self,
        request: Request,
        top_k: Annotated[
            int | None, Query(ge=1, description="labels per image (default from settings)")
        ] = None,
    ) -> Response:
        return await self.requests.serve(
            request,
            "predict",
            PREDICT_FIELDS,
            self._predict_params,
            self._render_predictions,
            frozenset({LOGITS}),
        )

    async def embed(
        self,
        request: Request,
        normalize: Annotated[bool | None, Query(description="L2-normalise (default true)")] = None,
        encoding: Annotated[
            Literal["json", "base64"] | None,
            Query(description="json: lists of floats; base64: little-endian float32 bytes"),
        ] = None,
    ) -> Response:
        return await self.requests.serve(
            request,
            "embed",
            EMBED_FIELDS,
            embed_params,
            self._render_embeddings,
            frozenset({EMBEDDING}),
        )

    def _predict_params(self, values: Any) -> PredictParams:
        package = self.runtime.package
        classes = package.manifest.num_classes if package is not None else 1 << 30
        return predict_params(values, self.settings.default_top_k, classes)

    def _model_ref(self) -> dict[str, Any]:
        package, served = self.runtime.package, self.runtime.served
        assert package is not None
        assert served is not None
        manifest = package.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "precision": str(served.precision),
            "trained": manifest.trained,
        }

    def _render_predictions(self, results: list[ImageResult], params: PredictParams) -> Response:
        package = self.runtime.package
        assert package is not None
        predictions = [postprocess.top_k(r.logits, params.top_k, package.labels) for r in results]
        return json_response({"model": self._model_ref(), "predictions": predictions})

    def _render_embeddings(self, results: list[ImageResult], params: EmbedParams) -> Response:
        vectors = [postprocess.embedding(r.embedding, params.normalize) for r in results]
        embeddings: list[Any] = (
            [postprocess.to_base64(v) for v in vectors] if params.encoding == "base64" else vectors
        )
        body = {
            "model": self._model_ref(),
            "embeddings": embeddings,
            "dim": int(vectors[0].shape[0]),
            "normalized": params.normalize,
            "encoding": params.encoding,
        }
        return json_response(body)

    # ------------------------------------------------------------ operations

    async def healthz(self) -> Response:
        if self.runtime.engine_gone:
            return error_response(EngineUnavailable())
        if self.runtime.state is State.FAILED:
            return error_response(NotReady(LOAD_FAILED))
        if not await self.runtime.live():
            return error_response(EngineUnavailable("the inference engine did not answer"))
        return json_response({"status": "ok"})

    async def readyz(self) -> Response:
        state = self.runtime.state
        if state is State.READY:
            return json_response({"status": "ready"})
        if state is State.DRAINING:
            return error_response(Draining())
        return error_response(NotReady(LOAD_FAILED if state is State.FAILED else None))

    async def info(self, request: Request) -> Response:
        info = describe(self.runtime, self.settings)
        processes = dict(request.app.state.processes)
        for name in ("engine_pid", "frontends_connected"):
            value = getattr(self.runtime.engine, name, None)
            if value is not None:
                processes[name] = value
        info["processes"] = processes
        return json_response(info)

    async def prometheus_metrics(self, request: Request) -> Response:
        accept = request.headers.get("accept")
        families = await self.runtime.server_metrics()
        if families is None:
            body, content_type = self.metrics.render_for(accept)
        else:
            body, content_type = aggregate.render(families, accept)
        return Response(body, media_type=content_type)


def describe(runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """The body of /info: what is served and how. No filesystem paths and no exception
    text: those go to the log, not to clients."""
    info: dict[str, Any] = {"state": str(runtime.state), "service_version": service_version()}
    if runtime.state is State.FAILED:
        info["error"] = LOAD_FAILED
    package = runtime.package
    if package is not None:
        manifest = package.manifest
        info["model"] = {
            "name": manifest.name,
            "version": manifest.version,
            "arch": manifest.arch,
            "trained": manifest.trained,
            "source": manifest.source.model_dump(exclude_none=True, exclude={"path"}),
            "num_classes": manifest.num_classes,
            "embedding_dim": manifest.embedding_dim,
            "created_at": manifest.created_at,
            "variants": sorted(manifest.variants),
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
            "runtime": served.runtime,
            "runtime_version": served.runtime_version,
            "precision": str(served.precision),
            "requested_precision": str(settings.precision),
            "execution_providers": served.providers,
            "providers_requested": served.providers_requested,
            "gpu_fallback": served.gpu_fallback is not None,
            "gpu_fallback_reason": served.gpu_fallback,
            "device": served.device,
            "warnings": served.warnings,
        }
        if package is not None:
            variant = package.manifest.variants[served.precision]
            serving["file"] = variant.file
            serving["sha256"] = variant.sha256
            serving["verified"] = variant.verification.passed
            serving["verified_against"] = variant.verification.reference
            serving["verified_on"] = variant.verification.provider
        info["serving"] = serving
    engine_info = runtime.engine.info
    info["threads"] = engine_info.threads if engine_info else runtime.threads.describe()
    info["batching"] = {
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_ms": settings.max_queue_delay_ms,
        "max_queue_size": settings.max_queue_size,
        "max_concurrent_batches": (
            runtime.policy.concurrent_batches if runtime.policy else settings.max_concurrent_batches
        ),
        "partial_batches_while_busy": (
            runtime.policy.partial_batches_while_busy if runtime.policy else None
        ),
        "busy_batch_size": runtime.policy.busy_batch_size if runtime.policy else None,
        "engine_ms_per_image": runtime.policy.engine_ms_per_image if runtime.policy else None,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    info["limits"] = {
        "max_images_per_request": settings.max_images_per_request,
        "max_body_bytes": settings.max_body_bytes,
        "max_buffered_bytes": settings.max_buffered_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "max_request_pixels": settings.max_request_pixels,
        "max_decoding_pixels": settings.max_decoding_pixels,
        "body_timeout_s": settings.body_timeout_s,
        "header_timeout_s": settings.header_timeout_s,
    }
    info["access"] = {"api_keys": bool(settings.api_keys or settings.api_keys_file)}
    return info
