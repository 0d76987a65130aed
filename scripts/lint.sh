#!/usr/bin/env bash
# The style and type checks CI runs (configured in pyproject.toml): ruff's linter, ruff's
# formatter (check only; `.venv/bin/ruff format .` applies it) and mypy on every package
# (core, server, edge_client, export, simulator).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy
