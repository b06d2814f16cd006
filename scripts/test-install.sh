#!/usr/bin/env bash
# Install the project into a fresh venv as a user would, then run the tests that exercise
# the third-party libraries it installed (FastAPI/Starlette/pydantic, ONNX Runtime, grpcio,
# protobuf and Triton's clients, the export's onnx/onnxscript/transformers/timm):
#   lowest  the lowest versions pyproject.toml allows for every direct dependency
#           (`uv pip compile --resolution lowest-direct`), so the floors we declare are tested
#   latest  no constraints at all: what `pip install` picks today, constraints.txt unused
# CI runs both after `make test` (.ci/run); they need the package index.
#
# torch and torchvision are pinned to one version in pyproject.toml, and with their CUDA
# libraries they are gigabytes: the venv borrows .venv's (scripts/share_torch.py, a .pth
# file) instead of installing them again. Everything else is installed into the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
case "$mode" in
  lowest | latest) ;;
  *) echo "usage: scripts/test-install.sh lowest|latest" >&2; exit 2 ;;
esac
extras="cpu,export,dev,grpc"
uv_version="0.13.9"  # resolves (and installs) the lowest versions
# Chosen by `pytest --durations`: the service, v2 and export suites' tests that reach the
# installed libraries, within CI's time. The session's resnet18 package (FP32 + INT8) is
# itself an export at these versions, verified against PyTorch.
tests=(
  tests/frontend/test_v2.py
  tests/frontend/test_v2_access.py
  tests/frontend/test_grpc_install.py
  "tests/frontend/test_service.py::test_predict_raw_body_matches_graph"
  "tests/frontend/test_service.py::test_embed_matches_graph"
  "tests/frontend/test_service.py::test_health_info_metrics"
  "tests/frontend/test_service.py::test_openapi_documents_inputs_and_its_example_works"
  "tests/frontend/test_service.py::test_int8_variant_is_served_when_asked"
  "tests/export/test_export.py::test_state_dict_round_trip[safetensors]"
  "tests/export/test_export.py::test_hf_resnet50_matches_transformers"
  "tests/export/test_mmpretrain.py::test_export_matches_pytorch[v1d-mmpretrain1]"
)
start=$SECONDS
scripts/setup.sh  # .venv, whose torch the venv borrows
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-python3}"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "test-install $mode: borrowing $(.venv/bin/python scripts/share_torch.py "$work/torch")"
echo "$work/torch" > "$site/zz_shared_torch.pth"  # after the venv's own site-packages
"$venv_python" -m pip install --quiet --upgrade pip
if [ "$mode" = lowest ]; then
  "$venv_python" -m pip install --quiet "uv==${uv_version}"
  uv="$work/venv/bin/uv"
  extra_args=()
  for extra in ${extras//,/ }; do extra_args+=(--extra "$extra"); done
  "$uv" pip compile --quiet pyproject.toml "${extra_args[@]}" --resolution lowest-direct \
    --python "$venv_python" --no-header --no-annotate -o "$work/lowest.txt"
  # Exactly those versions, less the borrowed ones (the same torch pins, from .venv).
  borrowed=$(find "$work/torch" -maxdepth 1 -name '*.dist-info' -printf '%f\n' \
    | sed -E 's/-[^-]+\.dist-info$//; s/_/-/g' | tr 'A-Z' 'a-z' | paste -sd'|')
  grep -vE "^(${borrowed})==" "$work/lowest.txt" > "$work/install.txt"
  "$uv" pip install --quiet --python "$venv_python" --no-deps -r "$work/install.txt"
  "$uv" pip install --quiet --python "$venv_python" --no-deps -e .
else
  # As a user installs: pip, no constraints (it finds the borrowed torch already there).
  "$venv_python" -m pip install --quiet -e ".[${extras}]"
fi
"$venv_python" -m pip check
"$venv_python" -m pip list --format=freeze 2>/dev/null | grep -iE \
  '^(fastapi|starlette|pydantic|uvicorn|numpy|pillow|onnxruntime|onnx|onnxscript|transformers|timm|grpcio|protobuf|tritonclient|msgspec|httpx|pytest)==' \
  | paste -sd' ' | sed "s/^/test-install $mode: /"
echo "test-install $mode: installed in $((SECONDS - start)) s"
"$venv_python" -m pytest -q -p no:cacheprovider --durations=10 "${tests[@]}"
echo "test-install $mode: done in $((SECONDS - start)) s"
