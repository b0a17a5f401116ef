#!/usr/bin/env bash
# Builds the Debian package with `cargo deb` (CI, issue 7) and checks what it would install:
#   - the files (dpkg-deb --contents): the binary, both units, the config, the docs;
#   - the control data: dependencies, the config as a conffile, maintainer scripts that parse and
#     create the sendwell user;
#   - the units in the package are systemd/'s (checked by scripts/check-systemd.sh);
#   - the packaged binary runs, and accepts the packaged config (with stand-in secrets).
# cargo-deb is installed when missing (about 40 s; pinned, because where units go has changed
# between its versions). `cargo deb` makes the real release build: about 6 minutes on 2 cores
# from a clean target/, 2 when only sendwell changed; --fast only lightens the compression.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION="3.8.0"
log() { echo "check-deb: $*"; }

if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  log "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
command -v dpkg-deb >/dev/null || { log "dpkg-deb is missing (Debian's dpkg)" >&2; exit 1; }

# The checks are about what the package holds and that its binary runs: in CI
# (CHECK_DEB_QUICK=1, set by .ci/run, after the tests) the package takes the dev profile's
# binary, which the tests' build already made (a release build took 4-6 minutes of a CI that
# must stay under 30); a package to ship is built without it, in release.
profile=()
build="release build"
if [ "${CHECK_DEB_QUICK:-0}" = 1 ]; then
    profile=(--profile dev)
    build="dev build, CHECK_DEB_QUICK=1"
fi
log "cargo deb ($build)"
deb="$(cargo deb --fast --quiet "${profile[@]}" -- --locked | tail -n 1)"
[ -f "$deb" ] || { log "cargo deb printed no package path (got: $deb)" >&2; exit 1; }
log "built $deb"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() { echo "check-deb: $*" >&2; fail=1; }

contents="$(dpkg-deb --contents "$deb")"
for f in \
  /usr/bin/sendwell \
  /usr/lib/systemd/system/sendwell.service \
  /usr/lib/systemd/system/sendwell@.service \
  /etc/sendwell/sendwell.toml \
  /usr/share/doc/sendwell/README.md \
  /usr/share/doc/sendwell/docs/operations.md \
  /usr/share/doc/sendwell/docs/configuration.md \
  /usr/share/doc/sendwell/examples/prometheus/alerts.yml; do
  if printf '%s\n' "$contents" | awk '{print $NF}' | grep -qxF ".$f"; then
    log "contains $f"
  else
    bad "the package lacks $f"
  fi
done

depends="$(dpkg-deb --field "$deb" Depends)"
for d in adduser ca-certificates libc6; do
  printf '%s\n' "$depends" | grep -qw "$d" || bad "Depends lacks $d: $depends"
done

dpkg-deb --control "$deb" "$tmp/control"
grep -qxF /etc/sendwell/sendwell.toml "$tmp/control/conffiles" ||
  bad "/etc/sendwell/sendwell.toml is not a conffile"
for s in postinst prerm postrm; do
  [ -x "$tmp/control/$s" ] || { bad "no executable $s"; continue; }
  sh -n "$tmp/control/$s" || bad "$s does not parse"
  if grep -q '#DEBHELPER#' "$tmp/control/$s"; then bad "$s still has #DEBHELPER#"; fi
done
grep -q 'adduser --system' "$tmp/control/postinst" || bad "postinst does not create the user"
grep -q 'deb-systemd-helper' "$tmp/control/postinst" || bad "postinst lacks the systemd part"

dpkg-deb --extract "$deb" "$tmp/root"
for u in sendwell.service sendwell@.service; do
  cmp -s "systemd/$u" "$tmp/root/usr/lib/systemd/system/$u" ||
    bad "packaged $u differs from systemd/$u"
done

bin="$tmp/root/usr/bin/sendwell"
"$bin" --version >/dev/null || bad "the packaged binary does not run"
# The packaged config must be valid once its secrets exist: stand-ins for the ones it names.
mkdir "$tmp/creds"
for c in broker-password example-token; do echo "stand-in" >"$tmp/creds/$c"; done
config="$tmp/root/etc/sendwell/sendwell.toml"
if out="$(CREDENTIALS_DIRECTORY="$tmp/creds" "$bin" check-config "$config" 2>&1)"; then
  log "the packaged config passes check-config"
else
  printf '%s\n' "$out" | tail -n 20 >&2
  bad "the packaged config fails check-config"
fi

[ "$fail" -eq 0 ] && log "ok ($(du -h "$deb" | cut -f1) package)"
exit "$fail"
