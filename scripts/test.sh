#!/usr/bin/env bash
# The test suite: set up (first time only), make sure a real Mosquitto is there, run pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing mosquitto"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "test: the tests need a real Mosquitto broker: sudo apt-get install mosquitto" >&2
    exit 2
  fi
fi
export FEDLORA_EDGE_PYTHON="$PWD/.venv-edge/bin/python"
exec .venv/bin/python -m pytest "$@"
