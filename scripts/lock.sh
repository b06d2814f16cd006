#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh environment holding every extra (the pins that CI,
# `make serve`, `make test` and the container image install from). Run after changing
# dependencies in pyproject.toml, then review the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu,export,dev,bench,tracing,deploy,grpc,openvino"
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet ".[${extras}]"
gpu_pin=$(grep -E '^onnxruntime-gpu==' constraints.txt || echo "onnxruntime-gpu==1.31.1")
{
  echo "# Pinned versions for every dependency of every extra (pip constraints), so a new release"
  echo "# upstream cannot change a build without a change here. Regenerate: scripts/lock.sh"
  echo "# (${extras//,/ + } extras installed; onnxruntime-gpu pinned by hand for the gpu extra)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -e '^-e' -e '^resnet-serve'
  echo "$gpu_pin"
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "lock: wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
