#!/usr/bin/env bash
# Runs every test against a real local RabbitMQ (installed and started when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
exec cargo test --all-targets "$@"
