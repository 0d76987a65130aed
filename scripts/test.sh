#!/usr/bin/env bash
# The test suite: set up (first time only), make sure a real Mosquitto and Prometheus are there, run pytest.
# Extra arguments go to pytest; --fast first runs the unit tests only (no brokers, processes or exports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
if { ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; } || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing mosquitto and prometheus"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto prometheus >/dev/null
  else
    echo "test: the tests need a real Mosquitto broker and Prometheus: sudo apt-get install mosquitto prometheus" >&2
    exit 2
  fi
fi
# The packet-loss fault test makes a network namespace with nftables rules (root only; it says so
# and skips where it cannot).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v nft >/dev/null || ! command -v ip >/dev/null; }; then
  echo "[test] installing nftables and iproute2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null || true
fi
# The image tests build the Dockerfile with buildah and run it from a debootstrapped Debian (root
# only; they say so and skip where they cannot).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; }; then
  echo "[test] installing buildah and debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null || true
fi
export FEDLORA_EDGE_PYTHON="$PWD/.venv-edge/bin/python"
if [ "${1:-}" = "--fast" ]; then  # unit tests only: no brokers, processes or exports
  shift
  exec .venv/bin/python -m pytest -m "not integration" "$@"
fi
exec .venv/bin/python -m pytest "$@"
