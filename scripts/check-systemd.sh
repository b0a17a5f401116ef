#!/usr/bin/env bash
# Checks the systemd units in systemd/ (CI, issue 7):
#   - `systemd-analyze verify` on sendwell.service, the template sendwell@.service and two of its
#     instances: any warning fails (verify exits 0 on unknown keys, so its output is checked);
#   - `systemd-analyze security --offline=yes`: the exposure of sendwell.service and of an
#     instance must be at most MAX_EXPOSURE (2.0);
#   - TimeoutStopSec longer than the packaged config's shutdown.grace_period.
# Needs no running systemd (works in a container). verify insists that ExecStart= binaries
# exist, so it runs on copies of the units in a temporary directory with /usr/bin/sendwell
# rewritten to an executable stub there; nothing else in the units is changed.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
units=(sendwell.service sendwell@.service)

if ! command -v systemd-analyze >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
echo "check-systemd: $(systemd-analyze --version | head -n 1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf '#!/bin/sh\nexit 0\n' >"$tmp/sendwell"
chmod 755 "$tmp/sendwell"
for u in "${units[@]}"; do
  sed "s#/usr/bin/sendwell#$tmp/sendwell#g" "systemd/$u" >"$tmp/$u"
done

fail=0
for u in sendwell.service sendwell@.service sendwell@0.service sendwell@12.service; do
  if ! out="$(cd "$tmp" && systemd-analyze verify "./$u" 2>&1)" || [ -n "$out" ]; then
    echo "check-systemd: verify $u failed:" >&2
    printf '%s\n' "$out" >&2
    fail=1
  else
    echo "check-systemd: verify $u: ok"
  fi
done

for u in sendwell.service sendwell@0.service; do
  out="$(cd "$tmp" && systemd-analyze security --offline=yes --no-pager "./$u" 2>&1)" || {
    printf '%s\n' "$out" >&2
    echo "check-systemd: systemd-analyze security $u failed" >&2
    exit 1
  }
  level="$(printf '%s\n' "$out" |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
  if [ -z "$level" ]; then
    printf '%s\n' "$out" >&2
    echo "check-systemd: no exposure level in the output for $u" >&2
    exit 1
  fi
  if awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l + 0 <= m + 0) }'; then
    echo "check-systemd: exposure of $u: $level (at most $MAX_EXPOSURE): ok"
  else
    printf '%s\n' "$out" | grep -F '✗' >&2 || true
    echo "check-systemd: exposure of $u is $level, above $MAX_EXPOSURE" >&2
    fail=1
  fi
done

# The stop timeout must leave room for the graceful shutdown (plain seconds: "45s", "30s").
grace="$(sed -n 's/^grace_period *= *"\([0-9]*\)s".*/\1/p' packaging/sendwell.toml)"
for u in "${units[@]}"; do
  stop="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "systemd/$u")"
  if [ -z "$grace" ] || [ -z "$stop" ] || [ "$stop" -le "$grace" ]; then
    echo "check-systemd: $u: TimeoutStopSec (${stop:-?}s) must be longer than" \
      "shutdown.grace_period (${grace:-?}s)" >&2
    fail=1
  fi
done

[ "$fail" -eq 0 ] && echo "check-systemd: ok"
exit "$fail"
