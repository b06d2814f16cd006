#!/usr/bin/env bash
# Run the preprocessing tests on the oldest Pillow that pyproject.toml allows, so the floor
# we declare is one we have tested (it lacks the AVIF plugin, for one). CI runs this after
# `make test`; it needs the package index for that one wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
floor=$(grep -oE '"pillow>=[0-9.]+"' pyproject.toml | grep -oE '[0-9]+(\.[0-9]+)+')
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
.venv/bin/python -m pip install --quiet --no-deps --target "$target" "pillow==${floor}"
PYTHONPATH="$target" .venv/bin/python -c \
  "import PIL, sys; print('pillow floor:', PIL.__version__); sys.exit(PIL.__version__.split('.')[:2] != '${floor}'.split('.')[:2])"
PYTHONPATH="$target" .venv/bin/python -m pytest tests/images/test_preprocess.py -q -p no:cacheprovider
