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
pg_suites=(send_path consent limits webhook process edges status_batches)
pg_pid=
if [ $# -eq 0 ]; then
  # The integration suites again with every instance's state in a PostgreSQL database of its
  # own (tests/common/pg.rs); tests/store_suite.rs already ran each store behaviour on both.
  # They run beside the main run rather than after it: most of both is waiting on the broker,
  # the sandbox's latency and PostgreSQL, and the tests are built to share the machine (a vhost
  # and a database each), which keeps CI under 30 minutes.
  # One build for both: cargo's messages name each test binary, which then runs on its own.
  target=${CARGO_TARGET_DIR:-target}
  mkdir -p "$target"
  msgs="$target/test-build-messages.json"
  pg_log="$target/test-postgres.log"
  cargo test --all-targets --no-run --message-format=json-render-diagnostics >"$msgs" || exit 101
  exes=()
  for t in "${pg_suites[@]}"; do
    exe=$(grep -F '"kind":["test"]' "$msgs" | grep -F "\"name\":\"$t\"" \
      | grep -o '"executable":"[^"]*"' | head -1 | cut -d'"' -f4) || true
    [ -n "$exe" ] || { echo "test.sh: no test binary for tests/$t.rs in $msgs" >&2; exit 101; }
    exes+=("$t=$exe")
  done
  echo "test.sh: the integration suites on PostgreSQL run beside this one; their log: $pg_log" >&2
  # A process group of its own (job control on for this one job), so that an interrupted run
  # also stops these tests and the daemons they started.
  set -m
  (
    failed=()
    for te in "${exes[@]}"; do
      echo "test.sh (PostgreSQL): tests/${te%%=*}.rs"
      SENDWELL_TEST_BACKEND=postgres "${te#*=}" || failed+=("${te%%=*}")
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "test.sh: FAILED on PostgreSQL: ${failed[*]}"
      exit 101
    fi
  ) </dev/null >"$pg_log" 2>&1 &
  pg_pid=$!
  set +m
  trap '[ -n "$pg_pid" ] && kill -- "-$pg_pid" 2>/dev/null || true' EXIT
fi
cargo test --all-targets --no-fail-fast "$@" || status=$?
if [ -n "$pg_pid" ]; then
  pg_status=0
  wait "$pg_pid" || pg_status=$?
  pg_pid=
  echo "test.sh: the integration suites again, with the state on PostgreSQL (they ran beside the above):" >&2
  cat "$pg_log"
  if [ "$pg_status" -ne 0 ]; then
    echo "test.sh: the PostgreSQL suites failed (status $pg_status): see above, or $pg_log" >&2
    status=$pg_status
  fi
fi
exit "$status"
