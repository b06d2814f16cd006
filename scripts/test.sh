#!/usr/bin/env bash
# Set up what the tests need, then run them (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/install-prometheus.sh
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# OpenVINO's runtime, once loaded, has crashed later tests in the same pytest process
# (segmentation faults in helm's Go library and in the process-fault tests): its tests run
# in a process of their own.
.venv/bin/python -m pytest --ignore=tests/engine/test_openvino.py
exec .venv/bin/python -m pytest tests/engine/test_openvino.py
