#!/usr/bin/env bash
# Regenerate the gRPC stubs of the Open Inference Protocol (service/frontend/v2/proto/) from its
# .proto; the generated files are committed, so neither the image nor CI needs grpcio-tools.
#
# Generated code runs on protobuf runtimes as new as or newer than the protoc that wrote it,
# never older (and grpcio likewise), so the stubs are written by the OLDEST grpcio-tools the
# project supports, pinned here, in a throwaway venv: the `grpc` extra's floors in
# pyproject.toml are the versions this writes (`Protobuf Python Version` and
# GRPC_GENERATED_VERSION in the stubs; tests/frontend/test_grpc_install.py checks they agree).
# Imports are rewritten to be package-relative.
set -euo pipefail
cd "$(dirname "$0")/.."
tools_version="1.66.0"  # protoc 27: protobuf gencode 5.27.2, grpc stubs for grpcio>=1.66.0
proto=service/frontend/v2/proto
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "grpcio-tools==${tools_version}"
"$venv/bin/python" -m grpc_tools.protoc -I "$proto" \
  --python_out="$proto" --pyi_out="$proto" --grpc_python_out="$proto" \
  "$proto/grpc_predict_v2.proto"
sed -i 's/^import grpc_predict_v2_pb2 as/from service.frontend.v2.proto import grpc_predict_v2_pb2 as/' \
  "$proto/grpc_predict_v2_pb2_grpc.py"
# A private descriptor pool: Triton's client registers the same `inference.*` messages in
# the default pool, and a process that imports both (the tests) must not collide.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' \
  "$proto/grpc_predict_v2_pb2.py"
echo "gen-grpc: wrote $proto/grpc_predict_v2_pb2{,_grpc}.py and .pyi with grpcio-tools ${tools_version}" \
  "($(grep -o 'Protobuf Python Version: .*' "$proto/grpc_predict_v2_pb2.py"))"
