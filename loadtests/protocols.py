"""`python -m loadtests.protocols`: one server, three protocols, the same images.

Closed-loop throughput of `/predict` (raw JPEG bodies), the Open Inference Protocol over
HTTP (BYTES with the binary tensor data extension) and over gRPC (`raw_input_contents`),
one after the other against one running server, each for `--duration-s` after
`--warmup-s`. Every protocol asks for the same answer: the top 5 classes of each image
(`top_k=5` on /predict, the classification extension on v2). The load generator shares
the machine with the server; its CPU use is reported beside each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import orjson

from loadtests import images
from loadtests.cli import ensure_package
from loadtests.client import REQUEST_TIMEOUT_S, LoadResult, _cpu_seconds, closed_loop, raw_request
from loadtests.server import free_port, running_server
from service.frontend.v2.proto import grpc_predict_v2_pb2 as pb
from service.frontend.v2.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.frontend.v2.tensors import serialize_bytes

TOP_K = 5
ENCODED_INPUT = "image_bytes"


def v2_http_request(model: str, batch: Sequence[bytes], host: str) -> bytes:
    """A pre-built v2 infer request: BYTES images as binary data, top 5 as binary output."""
    raw = serialize_bytes(list(batch))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": ENCODED_INPUT,
                    "datatype": "BYTES",
                    "shape": [len(batch)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "logits", "parameters": {"classification": TOP_K, "binary_data": True}}
            ],
        }
    )
    body = header + raw
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
        f"{len(header)}\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


def v2_grpc_request(model: str, batch: Sequence[bytes]) -> Any:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=ENCODED_INPUT, datatype="BYTES", shape=[len(batch)])
    request.raw_input_contents.append(serialize_bytes(list(batch)))
    output = request.outputs.add(name="logits")
    output.parameters["classification"].int64_param = TOP_K
    return request


async def grpc_closed_loop(
    address: str,
    requests: Sequence[Any],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    images_per_request: int,
) -> LoadResult:
    """`closed_loop` over gRPC: `concurrency` calls back to back on one channel."""
    result = LoadResult("closed", concurrency, duration_s, images_per_request)
    cycle = itertools.cycle(requests)
    start = time.perf_counter() + warmup_s
    stop = start + duration_s
    cpu_before: float | None = None
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        async def worker() -> None:
            nonlocal cpu_before
            while (sent := time.perf_counter()) < stop:
                if sent >= start and cpu_before is None:
                    cpu_before = _cpu_seconds()
                try:
                    await infer(next(cycle), timeout=REQUEST_TIMEOUT_S)
                    status = 200
                except grpc.aio.AioRpcError as error:
                    status = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503}.get(
                        error.code().name, 500
                    )
                if sent >= start:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    result.latencies_s.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.client_cpu_s = _cpu_seconds() - (cpu_before or _cpu_seconds())
    result.duration_s = max(duration_s, time.perf_counter() - start)
    return result


def batches(bodies: list[bytes], per_request: int) -> list[list[bytes]]:
    """Every rotation of the images, `per_request` at a time."""
    return [
        [bodies[(start + i) % len(bodies)] for i in range(per_request)]
        for start in range(len(bodies))
    ]


async def measure(
    host: str, port: int, grpc_port: int, model: str, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    groups = batches(images.small_jpegs(), args.images_per_request)
    where = f"{host}:{port}"
    if args.images_per_request == 1:
        predict = [
            raw_request(f"/predict?top_k={TOP_K}", g[0], "image/jpeg", where) for g in groups
        ]
    else:
        from loadtests.client import multipart_request

        predict = [multipart_request(f"/predict?top_k={TOP_K}", g, where) for g in groups]
    runs: dict[str, dict[str, Any]] = {}
    timing = (args.concurrency, args.duration_s, args.warmup_s, args.images_per_request)
    for name, prepared in (
        ("predict", predict),
        ("v2_http_binary", [v2_http_request(model, g, where) for g in groups]),
    ):
        print(f"  {name} ...", flush=True)
        result = await closed_loop(host, port, prepared, *timing)
        runs[name] = result.summary()
    print("  v2_grpc ...", flush=True)
    requests = [v2_grpc_request(model, g) for g in groups]
    result = await grpc_closed_loop(f"{host}:{grpc_port}", requests, *timing)
    runs["v2_grpc"] = result.summary()
    return runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.protocols",
        description="Closed-loop throughput of /predict vs the Open Inference Protocol over "
        "HTTP (binary BYTES) and gRPC, one server, the same images.",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models/resnet50"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--server-args", default="", help="extra resnet-serve flags, quoted")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ensure_package(args.model_dir, [args.precision])
    model = json.loads((args.model_dir / "manifest.json").read_text())["name"]
    grpc_port = free_port()
    server_args = ["--grpc-port", str(grpc_port), *args.server_args.split()]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "server-protocols.log"
    with running_server(args.model_dir, args.precision, server_args, log) as (host, port, _):
        runs = asyncio.run(measure(host, port, grpc_port, model, args))
    report = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args) | {"model_dir": str(args.model_dir), "out": str(args.out)},
        "runs": runs,
    }
    path = args.out / f"protocols-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        f"\n{'protocol':<16} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} "
        f"{'client cores':>13}"
    )
    for name, run in runs.items():
        print(
            f"{name:<16} {run['images_per_s']:>8} {run['p50_ms']:>8} {run['p99_ms']:>8} "
            f"{run['failed']:>7} {run['client_cpu_cores']:>13}"
        )
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
