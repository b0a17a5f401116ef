#!/usr/bin/env bash
# Quick start: runs sendwell on its embedded defaults — the local RabbitMQ (installed and started
# when missing), redb state, and the built-in sandbox instead of Meta.
# --postgres (first argument): the same with the state in the local PostgreSQL instead (installed
# and started when missing, role and database `sendwell`; see scripts/ensure-postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
postgres=false
if [ "${1:-}" = "--postgres" ]; then
  postgres=true
  shift
fi
scripts/ensure-rabbitmq.sh
if ! mkdir -p /var/lib/sendwell 2>/dev/null || [ ! -w /var/lib/sendwell ]; then
  export SENDWELL_STATE__DIR="${SENDWELL_STATE__DIR:-$PWD/state}"
fi
if $postgres; then
  scripts/ensure-postgres.sh
  state_dir="${SENDWELL_STATE__DIR:-/var/lib/sendwell}"
  mkdir -p "$state_dir"
  # The local role's password, as a secret file (never in the URL, the environment or a log).
  pw_file="$state_dir/postgres-password"
  # Made 0600 first: an older file keeps its mode when written again.
  install -m 600 /dev/null "$pw_file"
  printf '%s' "${SENDWELL_PG_PASSWORD:-sendwell}" >"$pw_file"

  export SENDWELL_STATE__BACKEND=postgres
  export SENDWELL_STATE__POSTGRES__URL="${SENDWELL_STATE__POSTGRES__URL:-postgres://sendwell@127.0.0.1:${SENDWELL_PG_PORT:-5432}/sendwell}"
  export SENDWELL_STATE__POSTGRES__PASSWORD_FILE="$pw_file"
  echo "run-daemon: state in PostgreSQL ($SENDWELL_STATE__POSTGRES__URL)" >&2
fi
# Not --quiet: the first build takes minutes, and a screen that shows nothing for that long
# looks hung. cargo's progress goes to stderr, the daemon's log after it.
echo "run-daemon: building sendwell with cargo (first build: about 10 minutes on 2 cores; then seconds)" >&2
exec cargo run --release -- run --config config/sendwell.toml "$@"
