#!/usr/bin/env bash
# Create .venv and install the project with the extras it needs, at the versions pinned in
# constraints.txt; re-runs only when pyproject.toml or constraints.txt changed.
# Usage: scripts/setup.sh [EXTRAS]   (default: cpu,export,dev,bench,tracing,deploy,grpc,openvino)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,export,dev,bench,tracing,deploy,grpc,openvino}"
# ONNX Runtime comes from exactly one of `cpu` and `gpu` (both install the `onnxruntime`
# module); no other extra brings it.
case ",$extras," in
  *,cpu,*,gpu,* | *,gpu,*,cpu,*)
    echo "setup: the cpu and gpu extras install two ONNX Runtime builds; choose one" >&2
    exit 1 ;;
  *,cpu,* | *,gpu,*) ;;
  *)
    echo "setup: add cpu or gpu to the extras ($extras): nothing else installs ONNX Runtime" >&2
    exit 1 ;;
esac
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed (found $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # Every version comes from constraints.txt (scripts/lock.sh writes it); pip takes the
  # wheels from its configured find-links/index (a local wheel where the machine has one).
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
