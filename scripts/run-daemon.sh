#!/usr/bin/env bash
# Quick start: runs sendwell on its embedded defaults — the local RabbitMQ (installed and started
# when missing), redb state, and the built-in sandbox instead of Meta.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
if ! mkdir -p /var/lib/sendwell 2>/dev/null || [ ! -w /var/lib/sendwell ]; then
  export SENDWELL_STATE__DIR="${SENDWELL_STATE__DIR:-$PWD/state}"
fi
exec cargo run --release --quiet -- run --config config/sendwell.toml "$@"
