#!/usr/bin/env bash
# Runs every test against a real local RabbitMQ (installed and started when missing), with
# promtool (Debian's prometheus package) for the metrics and alert-rule checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-promtool.sh # tests/observability.rs runs promtool
exec cargo test --all-targets "$@"
