#!/usr/bin/env bash
# Runs every test against a real local RabbitMQ (installed and started when missing), with
# promtool (Debian's prometheus package) for the metrics and alert-rule checks.
# --no-fail-fast: every test binary runs even after one failed, cargo lists every failed binary
# at the end, and the exit status is still non-zero (101) when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-promtool.sh # tests/observability.rs runs promtool
exec cargo test --all-targets --no-fail-fast "$@"
