#!/bin/sh
# Install the fedlora edge client from this bundle, offline.
#
#   sudo ./install.sh                       # into /opt/fedlora-edge, as a systemd service
#   PREFIX=$HOME/fedlora-edge ./install.sh  # anywhere, without the service
#
# Settings, from the environment:
#   PREFIX        install folder (default /opt/fedlora-edge): venv/, artifacts/, config/
#   STATE_DIR     the client's state: round, pending update, local adapter (default
#                 /var/lib/fedlora-edge with the service, else $PREFIX/state)
#   DATA          the device's training data file (default: the bundle config's "data")
#   PYTHON        interpreter for the venv (default python@PY_VERSION@, else python3)
#   SERVICE_USER  the service's dedicated user (default fedlora-edge; created if missing)
#   SYSTEMD=0     never install the service (it is installed only as root on a systemd host)
#   START=0       install and enable the service, but do not start it
#
# Nothing here touches the network: every file is checked against BUNDLE-MANIFEST.json, and
# pip installs from ./wheelhouse only (--no-index), each wheel checked against its sha256.
set -eu
umask 022  # the service user must read the venv and the artifacts; secrets get 600 explicitly

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
PREFIX=${PREFIX:-/opt/fedlora-edge}
SERVICE_USER=${SERVICE_USER:-fedlora-edge}
UNIT=fedlora-edge.service
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
PY_VERSION=@PY_VERSION@
MACHINE=@MACHINE@
FEDLORA_WHEEL=$HERE/wheelhouse/@FEDLORA_WHEEL@
PIP_WHEEL=$HERE/wheelhouse/@PIP_WHEEL@

say() { printf '[install] %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

service=no
if [ "${SYSTEMD:-auto}" != 0 ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
  service=yes
fi
if [ -z "${STATE_DIR:-}" ]; then
  if [ $service = yes ]; then STATE_DIR=/var/lib/fedlora-edge; else STATE_DIR=$PREFIX/state; fi
fi
for p in "$PREFIX" "$STATE_DIR"; do
  case $p in /*) ;; *) die "PREFIX and STATE_DIR must be absolute paths, not '$p'" ;; esac
done
for p in "$PREFIX" "$STATE_DIR" "${DATA:-}"; do
  case $p in *[[:space:]]*) die "PREFIX, STATE_DIR and DATA must not contain spaces: '$p'" ;; esac
done
case $PREFIX in /|/usr|/usr/local|/opt|/var|/etc|/home) die "PREFIX=$PREFIX: give the client its own folder" ;; esac

# 1. An interpreter the bundled wheels are built for.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v "python$PY_VERSION" >/dev/null 2>&1; then PY=python$PY_VERSION
else PY=python3; fi
found=$("$PY" -c 'import platform, sys; print("%d.%d-%s" % (sys.version_info[0], sys.version_info[1], platform.machine()))' 2>/dev/null) \
  || die "no Python interpreter '$PY' (set PYTHON=/path/to/python$PY_VERSION)"
[ "$found" = "$PY_VERSION-$MACHINE" ] \
  || die "this bundle's wheels are for CPython $PY_VERSION on $MACHINE; $PY is $found (set PYTHON=...)"

# 2. Every file of the bundle against BUNDLE-MANIFEST.json (stdlib only, from the client wheel).
bundle_py() {
  "$PY" -I -S -c 'import sys; sys.path.insert(0, sys.argv[1]); from edge_client.flashing.install import main; sys.exit(main(sys.argv[2:]))' \
    "$FEDLORA_WHEEL" "$@"
}
bundle_py verify "$HERE"

# 3. A fresh virtual environment holding exactly the bundled wheels. pip runs from its wheel,
#    so the interpreter needs no ensurepip (Debian's python3 without python3-venv works).
if [ $service = yes ] && systemctl is-active --quiet "$UNIT"; then
  say "stopping the running $UNIT"
  systemctl stop "$UNIT"
fi
mkdir -p "$PREFIX"
rm -rf "$PREFIX/venv"
say "creating $PREFIX/venv with $PY ($found)"
"$PY" -m venv --without-pip "$PREFIX/venv"
say "installing $(grep -c -- '--hash=' "$HERE/requirements.txt") wheels from the bundle (no network)"
PIP_CONFIG_FILE=/dev/null "$PREFIX/venv/bin/python" "$PIP_WHEEL/pip" install --isolated --no-index \
  --find-links "$HERE/wheelhouse" --require-hashes --no-cache-dir --disable-pip-version-check \
  --no-warn-script-location --quiet @PIP_NO_DEPS@ -r "$HERE/requirements.txt"

# 4. The service user, then artifacts, config, credentials and the unit file under $PREFIX.
owner=
if [ $service = yes ]; then
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating the system user $SERVICE_USER"
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --no-create-home --home-dir "$STATE_DIR" --shell "$nologin" "$SERVICE_USER"
  fi
  owner=$SERVICE_USER
fi
set -- --source "$HERE" --prefix "$PREFIX" --state-dir "$STATE_DIR"
if [ -n "${DATA:-}" ]; then set -- "$@" --data "$DATA"; fi
if [ -n "$owner" ]; then set -- "$@" --user "$owner" --unit-path "$UNIT_DIR/$UNIT"; fi
"$PREFIX/venv/bin/python" -I -m edge_client.flashing.install install-files "$@"
# shellcheck source=/dev/null
. "$PREFIX/install.env"

# 5. The service: only as root on a systemd host.
if [ $service = yes ]; then
  install -m 644 "$PREFIX/$UNIT" "$UNIT_DIR/$UNIT"
  systemctl daemon-reload
  systemctl enable --quiet "$UNIT"
  if [ "$PROVISIONED" = yes ] && [ "${START:-1}" != 0 ]; then
    systemctl restart "$UNIT"
    say "started $UNIT; logs: journalctl -u $UNIT -f"
  else
    say "enabled $UNIT, not started: provision $PREFIX/config/credentials.env, then: systemctl start $UNIT"
  fi
else
  say "no service installed (needs root and systemd); run the client with:"
  say "  $PREFIX/venv/bin/fedlora-edge run --config $PREFIX/config/device.json --env-file $PREFIX/config/credentials.env"
fi
say "check this device: $PREFIX/venv/bin/fedlora-edge doctor"
