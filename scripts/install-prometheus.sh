#!/usr/bin/env bash
# The observability tests run a real Prometheus server and promtool (Debian's `prometheus`
# package). Install it when missing and we are root; otherwise say how, and let the tests
# decide (they fail under CI=true, skip elsewhere).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install-prometheus: installing Debian's prometheus package (prometheus, promtool)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  exit 0
fi
echo "install-prometheus: prometheus/promtool not found and cannot install them here" \
  "(need root and apt-get): install Debian's 'prometheus' package or put both on PATH" >&2
