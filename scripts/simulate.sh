#!/usr/bin/env bash
# The main job: set up (first time only), then a federated run of MiniLM on BBC News across
# 10 device processes (Dirichlet alpha 0.5) with the embedded broker. Extra arguments go to
# `fedlora simulate` (see --help). The report lands in runs/latest/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/fedlora simulate "$@"
