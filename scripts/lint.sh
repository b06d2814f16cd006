#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu,export,dev,bench,deploy
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
