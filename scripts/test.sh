#!/usr/bin/env bash
# Set up what the tests need, then run them (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/install-prometheus.sh
exec .venv/bin/python -m pytest "$@"
