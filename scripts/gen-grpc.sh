#!/usr/bin/env bash
# Regenerate the gRPC stubs of the Open Inference Protocol (service/frontend/v2/proto/) from its
# .proto; the generated files are committed, so neither the image nor CI needs grpcio-tools.
# Needs grpcio-tools (dev extra). Imports are rewritten to be package-relative.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I service/frontend/v2/proto \
  --python_out=service/frontend/v2/proto --pyi_out=service/frontend/v2/proto --grpc_python_out=service/frontend/v2/proto \
  service/frontend/v2/proto/grpc_predict_v2.proto
sed -i 's/^import grpc_predict_v2_pb2 as/from service.frontend.v2.proto import grpc_predict_v2_pb2 as/' \
  service/frontend/v2/proto/grpc_predict_v2_pb2_grpc.py
# A private descriptor pool: Triton's client registers the same `inference.*` messages in
# the default pool, and a process that imports both (the tests) must not collide.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' \
  service/frontend/v2/proto/grpc_predict_v2_pb2.py
echo "gen-grpc: wrote service/frontend/v2/proto/grpc_predict_v2_pb2{,_grpc}.py and .pyi"
