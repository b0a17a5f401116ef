#!/usr/bin/env bash
# Where a callback's CPU goes in the daemon: runs the load bench with Meta's callbacks on
# (SENDWELL_BENCH_CALLBACKS=only), samples the daemon with perf (DWARF call graphs) for a few
# seconds mid-run, and prints the share of its samples under each stage of a callback.
#
#   bash scripts/profile-callbacks.sh [daemon binary]   # default: the one the bench builds
#
# Needs perf (Debian's linux-perf) and the local RabbitMQ. Env: SENDWELL_BENCH_JOBS (40000),
# SENDWELL_BENCH_LATENCY_MS (50), PROFILE_SECONDS (8), PROFILE_OUT (target/callbacks.perf).
# The shares overlap (a stage's share includes what it calls); "kernel" is time in syscalls
# under any of them. PROFILE_REPORT_ONLY=<perf.data> prints the shares of an earlier recording.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
out=${PROFILE_OUT:-$target/callbacks.perf}
secs=${PROFILE_SECONDS:-8}
daemons=()
if [ $# -gt 0 ]; then daemons=(SENDWELL_BENCH_DAEMONS="profiled=$1"); fi
summary() {
    report=$(perf report -i "$1" --children --sort sym --stdio -g none 2>/dev/null | grep '%' | grep -v '^#')
    share() { # the largest "children" share among symbols matching any regex given (grep -E)
        local args=()
        for p in "$@"; do args+=(-e "$p"); done
        printf '%s\n' "$report" | grep -E "${args[@]}" | awk '{ gsub("%", "", $1); v = $1 + 0; if (v > m) m = v } END { printf "%5.1f %%", m + 0 }'
    }
    total() { # the sum of the shares of symbols matching $1 (one line per monomorphised copy)
        printf '%s\n' "$report" | grep -F -- "$1" | awk '{ gsub("%", "", $1); m += $1 } END { printf "%5.1f %%", m + 0 }'
    }
    # A lane's stages are boxed futures since ad80f1f: their frames are named by the async
    # block or fn they poll, not by the function (the second pattern of each).
    echo "daemon samples under each stage ($1):"
    echo "  HTTP server (hyper connections, all requests)  $(share 'hyper_util::server::conn::auto::UpgradeableConnection')"
    echo "    webhook handler (signature, parse, publish)  $(share 'State<alloc::sync::Arc<sendwell::webhook::Listener')"
    echo "      publish to the broker with confirm         $(share 'sendwell::webhook::publish_(one|batch|confirmed)')"
    echo "  lanes (jobs and webhook events)                $(share 'sendwell::amqp::consumer::Worker::run_lane' 'sendwell::amqp::consumer::\{impl#[0-9]+\}::enqueue::\{async_block_env')"
    echo "    apply a webhook event                        $(share 'sendwell::amqp::consumer::Worker::settle_webhook' 'sendwell::amqp::consumer::\{impl#[0-9]+\}::settle_webhook::\{async_fn_env')"
    echo "  state store writer thread                      $(share 'sendwell::store::ledger::Writer::run')"
    echo "  AMQP I/O threads (lapin, both links)           $(total 'lapin::io_loop::IoLoop<RK,C>::run')"
    echo "  kernel (syscalls)                              $(share 'entry_SYSCALL_64_after_hwframe')"
}
if [ -n "${PROFILE_REPORT_ONLY:-}" ]; then
    summary "$PROFILE_REPORT_ONLY"
    exit 0
fi
log=$(mktemp)
env "${daemons[@]}" SENDWELL_BENCH_JOBS="${SENDWELL_BENCH_JOBS:-40000}" \
    SENDWELL_BENCH_LATENCY_MS="${SENDWELL_BENCH_LATENCY_MS:-50}" SENDWELL_BENCH_BASELINE=0 \
    SENDWELL_BENCH_CALLBACKS=only SENDWELL_BENCH_OUT="$target/bench-profile.json" \
    cargo bench --bench load >"$log" 2>&1 &
bench=$!
pid=
for _ in $(seq 1 900); do
    pid=$(pgrep -f " run --config .*/sendwell.toml" | head -1 || true)
    [ -n "$pid" ] && break
    kill -0 "$bench" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
done
[ -n "$pid" ] || { echo "the daemon did not start" >&2; exit 1; }
sleep 5 # past the start, into the steady state
perf record -F 300 --call-graph dwarf,16384 -p "$pid" -o "$out" -- sleep "$secs" >/dev/null
wait "$bench" || true
grep -E "^\| [0-9]+ ms \| sendwell|CPU µs/job by thread" "$log" || true
echo
summary "$out"
rm -f "$log"
