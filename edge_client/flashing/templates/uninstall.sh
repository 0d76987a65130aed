#!/bin/sh
# Remove the fedlora edge client that install.sh put under PREFIX (default /opt/fedlora-edge).
#
#   sudo ./uninstall.sh            # stop and remove the service and PREFIX; keep the state
#   sudo PURGE=1 ./uninstall.sh    # also delete the state directory and the service user
set -eu

PREFIX=${PREFIX:-/opt/fedlora-edge}
say() { printf '[uninstall] %s\n' "$*"; }
die() { printf 'uninstall.sh: error: %s\n' "$*" >&2; exit 1; }

[ -f "$PREFIX/install.env" ] || die "$PREFIX has no install.env: not a fedlora edge install (set PREFIX=...)"
# shellcheck source=/dev/null
. "$PREFIX/install.env"

if [ -n "${UNIT_PATH:-}" ] && [ -f "$UNIT_PATH" ]; then
  unit=$(basename "$UNIT_PATH")
  say "stopping and removing $unit"
  systemctl disable --now "$unit" >/dev/null 2>&1 || true
  rm -f "$UNIT_PATH"
  systemctl daemon-reload || true
fi
case $STATE_DIR in
  "$PREFIX"/*)
    if [ "${PURGE:-0}" = 1 ]; then rm -rf "$PREFIX"; else
      say "removing $PREFIX except $STATE_DIR"
      for f in "$PREFIX"/* "$PREFIX"/.[!.]*; do
        if [ -e "$f" ] && [ "$f" != "$STATE_DIR" ]; then rm -rf "$f"; fi
      done
    fi ;;
  *) say "removing $PREFIX"; rm -rf "$PREFIX" ;;
esac
if [ "${PURGE:-0}" = 1 ]; then
  case $STATE_DIR in /|/var|/var/lib|/opt|/home|/root|/etc|/usr) die "refusing to delete STATE_DIR=$STATE_DIR" ;; esac
  say "deleting the state in $STATE_DIR"
  rm -rf "$STATE_DIR"
  if [ -n "${SERVICE_USER:-}" ] && id "$SERVICE_USER" >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    userdel "$SERVICE_USER" || true
  fi
else
  say "kept the state in $STATE_DIR (PURGE=1 deletes it)"
fi
