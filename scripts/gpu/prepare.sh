#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU session: what the device machine lacks, cut to
# fit its calls (each carries at most 64 MiB). docs/benchmarks.md, "GPU", says how to use it.
#
#   .gpu/p1 .. .gpu/p4   onnxruntime-gpu, unpacked with its TensorRT provider left out (that
#                        library needs TensorRT, which we do not use), as one tar.xz in four
#                        parts, each with the SHA-256 of the whole
#   .whl/                the service's own wheels for CPython 3.12 the machine lacks
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU=onnxruntime-gpu==1.31.1
PARTS=4
PYTHON=${PYTHON:-python3}
download() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 "$@"
}
pin() { grep -i -E "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" constraints.txt | head -1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download -d "$work" "$ORT_GPU"
mkdir "$work/x"
(cd "$work/x" && unzip -q ../onnxruntime_gpu-*.whl && rm onnxruntime/capi/libonnxruntime_providers_tensorrt.so)
tar -C "$work/x" -cf - . | xz -T0 -6 > "$work/ort-gpu.tar.xz"
rm -rf .gpu && mkdir -p .gpu
(cd "$work" && split -n "$PARTS" -d -a 1 ort-gpu.tar.xz part-)
sum=$(sha256sum "$work/ort-gpu.tar.xz" | cut -d' ' -f1)
for index in $(seq 1 "$PARTS"); do
  mkdir -p ".gpu/p$index"
  mv "$work/part-$((index - 1))" ".gpu/p$index/part"
  echo "$sum" > ".gpu/p$index/SHA256"
done

rm -rf .whl && mkdir -p .whl
# The machine's image lacks these or holds versions too old (fastapi needs
# opentelemetry-api; the committed gRPC stubs need grpcio >= 1.85 and their protobuf).
names=(fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv
       annotated-types typing-inspection python-multipart orjson python-json-logger
       fastapi-offline httptools annotated-doc anyio typing_extensions opentelemetry-api
       grpcio protobuf)
pins=()
for name in "${names[@]}"; do
  line=$(pin "$name")
  [ -n "$line" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  pins+=("$line")
done
download -d .whl "${pins[@]}"
du -sh .gpu/p* .whl
