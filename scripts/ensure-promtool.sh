#!/usr/bin/env bash
# Makes sure `promtool` is on the PATH: installs Debian's `prometheus` package when it is missing
# (promtool checks the alert rules and the scraped /metrics; see tests/observability.rs).
# Idempotent. Debian/Ubuntu (apt); needs root (or sudo) to install.
#
# The package would also start (and enable) a Prometheus server on :9090. We only want the
# tool, so the install runs with service starts denied (policy-rc.d, exit 101), and on a
# systemd host the unit we just installed is disabled again: nothing is left listening.
set -euo pipefail

log() { echo "ensure-promtool: $*" >&2; }
command -v promtool >/dev/null 2>&1 && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

POLICY=/usr/sbin/policy-rc.d
OURS=""
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# ensure-promtool.sh: no service starts while installing\nexit 101\n' \
    | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  OURS=1
fi
cleanup() { if [ -n "$OURS" ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT

log "installing Debian's prometheus package (for promtool; its server is not started)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus >/dev/null

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

command -v promtool >/dev/null 2>&1 || { log "promtool still missing after the install"; exit 1; }
log "$(promtool --version 2>&1 | head -n1)"
