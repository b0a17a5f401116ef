#!/usr/bin/env bash
# Runs every test against a real local RabbitMQ and PostgreSQL (installed and started when
# missing), with promtool (Debian's prometheus package) for the metrics and alert-rule checks.
# --no-fail-fast: every test binary runs even after one failed, cargo lists every failed binary
# at the end, and the exit status is still non-zero (101) when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-postgres.sh # role and database `sendwell`; tests/common/pg.rs makes one database per test
# Where the tests' PostgreSQL is; set them beforehand to use another server.
export SENDWELL_TEST_PG_URL="${SENDWELL_TEST_PG_URL:-postgres://sendwell@127.0.0.1:5432/sendwell}"
export SENDWELL_TEST_PG_PASSWORD="${SENDWELL_TEST_PG_PASSWORD:-${SENDWELL_PG_PASSWORD:-sendwell}}"
scripts/ensure-promtool.sh # tests/observability.rs runs promtool
status=0
cargo test --all-targets --no-fail-fast "$@" || status=$?
if [ $# -eq 0 ]; then
  # The integration suites again with every instance's state in a PostgreSQL database of its
  # own (tests/common/pg.rs); tests/store_suite.rs already ran each store behaviour on both.
  echo "test.sh: the integration suites again, with the state on PostgreSQL" >&2
  SENDWELL_TEST_BACKEND=postgres cargo test --no-fail-fast \
    --test send_path --test consent --test limits --test webhook --test process --test edges \
    --test status_batches \
    || status=$?
fi
exit "$status"
