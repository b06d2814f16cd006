#!/usr/bin/env bash
# The main job: make sure a model package exists (pretrained ImageNet weights where the
# internet is reachable, otherwise seeded random weights with a loud warning), then serve
# it on 127.0.0.1:8000 on the CPU. Settings: MODEL_DIR, ARCH, PRECISION, HOST, PORT, and
# any RESNET_SERVE_* variable (see `resnet-serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu,export
model_dir="${MODEL_DIR:-models/resnet50}"
arch="${ARCH:-resnet50}"
precision="${PRECISION:-int8}"
if [ ! -f "$model_dir/manifest.json" ]; then
  echo "serve: no model package at $model_dir; exporting $arch (fp32 + $precision)"
  if ! .venv/bin/resnet-export --arch "$arch" --weights DEFAULT --precision "$precision" --out "$model_dir"; then
    echo
    echo "################################################################################"
    echo "# serve: pretrained weights could not be downloaded (no internet?)."
    echo "# Exporting $arch with RANDOM, UNTRAINED weights instead: the service will run,"
    echo "# but its labels are MEANINGLESS. For real use: see README, 'Real weights'."
    echo "################################################################################"
    echo
    .venv/bin/resnet-export --arch "$arch" --random-init --seed 0 --precision "$precision" --out "$model_dir"
  fi
fi
exec .venv/bin/resnet-serve --model-dir "$model_dir" --precision "$precision" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
