#!/usr/bin/env bash
# Quick start: runs sendwell on its embedded defaults — the local RabbitMQ (installed and started
# when missing), redb state, and the built-in sandbox instead of Meta.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
if ! mkdir -p /var/lib/sendwell 2>/dev/null || [ ! -w /var/lib/sendwell ]; then
  export SENDWELL_STATE__DIR="${SENDWELL_STATE__DIR:-$PWD/state}"
fi
# Not --quiet: the first build takes minutes, and a screen that shows nothing for that long
# looks hung. cargo's progress goes to stderr, the daemon's log after it.
echo "run-daemon: building sendwell with cargo (first build: about 10 minutes on 2 cores; then seconds)" >&2
exec cargo run --release -- run --config config/sendwell.toml "$@"
