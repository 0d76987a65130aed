#!/usr/bin/env bash
# The main job: set up (first time only), then a federated run of MiniLM on BBC News across
# 10 device processes (Dirichlet alpha 0.5) with the embedded broker. Extra arguments go to
# `fedlora simulate` (see --help). The report lands in runs/latest/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Device processes run in the torch-free device environment, as on a real device.
exec .venv/bin/fedlora simulate --device-python "$PWD/.venv-edge/bin/python" "$@"
