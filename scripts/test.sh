#!/usr/bin/env bash
# Set up what the tests need, then run them (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu,export,dev,bench,deploy
exec .venv/bin/python -m pytest "$@"
