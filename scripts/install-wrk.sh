#!/usr/bin/env bash
# loadtests.overhead drives servers with wrk (Debian's `wrk` package). Install it when
# missing and we are root; otherwise say how.
set -euo pipefail
if command -v wrk >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install-wrk: installing Debian's wrk package" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null
  exit 0
fi
echo "install-wrk: wrk not found and cannot install it here (need root and apt-get):" \
  "install Debian's 'wrk' package or put it on PATH" >&2
exit 1
