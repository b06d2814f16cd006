"""The naive baseline: what a team writes in an afternoon, to measure batching against.

A minimal FastAPI app serving the same package: `POST /predict` takes one raw image body,
decodes it with the service's own preprocessing and calls `session.run` once for it, in
the default thread pool (Starlette's `run_in_threadpool`, 40 threads), on one session with
ONNX Runtime's default options. No batching, no queue, no admission control. The benchmark
runs it beside `resnet-serve` and reports figures as ratios to it (`loadtests/openloop.py`).

    python -m loadtests.naive --model-dir models/resnet50 --precision int8 --port 8100
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from service.errors import ServiceError
from service.images.postprocess import top_k
from service.images.preprocess import ImagePreprocessor
from service.model_package import ModelPackage, Precision

MAX_IMAGE_PIXELS = 50_000_000


def create_naive_app(model_dir: Path, precision: Precision) -> FastAPI:
    package = ModelPackage.load(model_dir)
    path = package.variant_path(precision)
    if path is None:
        raise SystemExit(f"{model_dir} has no {precision} variant")
    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    input_name = session.get_inputs()[0].name
    preprocess = ImagePreprocessor(package.manifest.preprocessing, MAX_IMAGE_PIXELS)
    app = FastAPI()

    def infer(body: bytes) -> dict[str, Any]:
        try:
            pixels = preprocess(body)
        except ServiceError as error:
            raise HTTPException(error.status, error.message) from error
        logits = session.run(["logits"], {input_name: pixels[None]})[0]
        return {"predictions": [top_k(logits[0], 5, package.labels)]}

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(infer, await request.body())

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.naive", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="int8", choices=[p.value for p in Precision])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    app = create_naive_app(args.model_dir, Precision(args.precision))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
