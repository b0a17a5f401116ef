#!/usr/bin/env bash
# Rehearses docs/operations.md "Several instances: a walk-through" on this one machine: two
# instances of shard 0 on one PostgreSQL database, jobs flowing, shard 1 added (two instances)
# while they flow, the active instance of shard 0 SIGKILLed and started again, then a second
# round of jobs that the frequency cap must stop on whichever shard now holds each recipient.
# It checks what the walk-through promises and prints what it saw:
#   - every job has exactly one final outcome;
#   - the Cloud API stand-in saw no job id twice;
#   - the second round is `suppressed/frequency_cap` for every recipient (caps held across the
#     failover and the reshard);
#   - each shard has one active instance and one standby at the end.
# Everything lives in a vhost and a database of its own (`sendwell-try`, `sendwell_try`),
# made anew at each run; the local RabbitMQ and PostgreSQL are installed and started when
# missing. SENDWELL_BIN picks the binary (default: a release build, built when missing);
# N (default 1500) the recipients. Takes about a minute once built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${SENDWELL_BIN:-target/release/sendwell}
n=${N:-1500}
if [ ! -x "$bin" ]; then
  cargo build --release --bin sendwell
fi
bin=$(realpath "$bin")
scripts/ensure-rabbitmq.sh >/dev/null
scripts/ensure-postgres.sh >/dev/null

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
vhost=sendwell-try
db=sendwell_try
work=$(mktemp -d /tmp/sendwell-try.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }

say "fresh vhost $vhost and database $db; logs and files in $work"
$SUDO rabbitmqctl -q delete_vhost "$vhost" 2>/dev/null || true
$SUDO rabbitmqctl -q add_vhost "$vhost"
$SUDO rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'
$SUDO runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres \
  -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db OWNER sendwell"

# The shipped config, its secret files beside it; the rest by environment, as the units do.
cp config/sendwell.toml config/sandbox-* "$work/"
printf '%s' "${SENDWELL_PG_PASSWORD:-sendwell}" >"$work/postgres-password"
chmod 600 "$work/postgres-password"
export SENDWELL_BROKER__URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
export SENDWELL_STATE__BACKEND=postgres
# TRY_PG_HOSTS: e.g. "127.0.0.1:5433,127.0.0.1:5432" to try a URL that lists a primary and a
# replica (the daemon connects to whichever accepts writes).
export SENDWELL_STATE__POSTGRES__URL="postgres://sendwell@${TRY_PG_HOSTS:-127.0.0.1:5432}/$db?target_session_attrs=read-write"
export SENDWELL_STATE__POSTGRES__PASSWORD_FILE="$work/postgres-password"
export SENDWELL_SANDBOX__ENABLED=false
export SENDWELL_CLOUD_API__BASE_URL=http://127.0.0.1:18089
export SENDWELL_WEBHOOK__ENABLED=false
export SENDWELL_LOG__FORMAT=text
config="$work/sendwell.toml"

say "the Cloud API stand-in on 127.0.0.1:18089, 200 ms per call"
"$bin" sandbox --listen 127.0.0.1:18089 --latency 200ms --rate-5xx 0 --rate-throttle 0 \
  --rate-undeliverable 0 --token "$(cat config/sandbox-token)" >"$work/sandbox.log" 2>&1 &
pids+=($!)

say "consent for $n recipients (opt-in and confirm), imported before any daemon runs"
at=$(date -u -d '-1 hour' +%Y-%m-%dT%H:%M:%SZ)
confirmed=$(date -u -d '-59 minutes' +%Y-%m-%dT%H:%M:%SZ)
for i in $(seq 1 "$n"); do
  to=$(printf '+49170%07d' "$i")
  printf '{"type":"opt_in","account":"acme-de","to":"%s","purposes":["newsletter"],"source":"walkthrough","at":"%s"}\n' "$to" "$at"
  printf '{"type":"confirm","account":"acme-de","to":"%s","purposes":["newsletter"],"at":"%s"}\n' "$to" "$confirmed"
done >"$work/consent.jsonl"
"$bin" consent import --config "$config" "$work/consent.jsonl" | tail -n 3

declare -A pid_of port_of
port=9300
start() { # name shard
  local name=$1 shard=$2
  port=$((port + 1))
  SENDWELL_BROKER__SHARD=$shard SENDWELL_ADMIN__LISTEN=127.0.0.1:$port \
    SENDWELL_STATE__DIR="$work/state-$name" \
    "$bin" run --config "$config" >>"$work/$name.log" 2>&1 &
  pid_of[$name]=$!
  port_of[$name]=$port
  pids+=($!)
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return 0
    sleep 0.2
  done
  echo "$name did not become ready; its log:" >&2
  tail -n 30 "$work/$name.log" >&2
  exit 1
}
role() { # name -> active|standby
  curl -s "http://127.0.0.1:${port_of[$1]}/readyz" | sed -n 's/^role: \([a-z]*\).*/\1/p'
}
active_of() { # shard -> name of its active instance (waits for one)
  local shard=$1
  for _ in $(seq 1 300); do
    for name in "${!port_of[@]}"; do
      if [[ $name == *"$shard" ]] && kill -0 "${pid_of[$name]}" 2>/dev/null \
        && [ "$(role "$name")" = active ]; then
        echo "$name"
        return 0
      fi
    done
    sleep 0.2
  done
  echo "no active instance for shard $shard" >&2
  exit 1
}
jobs_file() { # round -> a job per recipient
  for i in $(seq 1 "$n"); do
    printf '{"id":"%s-%d","account":"acme-de","to":"+49170%07d","category":"marketing","purpose":"newsletter","template":{"name":"spring_sale","language":"de","components":[]}}\n' "$1" "$i" "$i"
  done
}
finals() { # file -> count of final outcomes
  grep -c -E '"status":"(sent|suppressed|failed|expired|invalid|duplicate)"' "$1" || true
}

say "shard 0: instances a0 and b0 (machine 1 and machine 2 in the walk-through)"
start a0 0
start b0 0
echo "a0: $(role a0), b0: $(role b0)  (a standby learns its role from its probes within seconds)"

"$bin" tail --config "$config" >"$work/outcomes.jsonl" 2>"$work/tail.log" &
tail_pid=$!
pids+=($tail_pid)
sleep 1 # the tail's queue is bound before the first publish

say "round 1: $n marketing jobs, one per recipient"
jobs_file r1 >"$work/r1.jsonl"
"$bin" publish --config "$config" --file "$work/r1.jsonl" >/dev/null
until [ "$(finals "$work/outcomes.jsonl")" -ge $((n / 4)) ]; do sleep 0.2; done

say "adding shard 1 while jobs flow: instances a1 and b1"
start a1 1
start b1 1
until [ "$(finals "$work/outcomes.jsonl")" -ge $((n / 2)) ]; do sleep 0.2; done

victim=$(active_of 0)
say "SIGKILL the active instance of shard 0 ($victim), then start it again"
kill -9 "${pid_of[$victim]}"
new=$(active_of 0)
echo "shard 0 is now served by $new"
start "$victim" 0
echo "$victim is back: $(role "$victim")"

for _ in $(seq 1 900); do
  [ "$(finals "$work/outcomes.jsonl")" -ge "$n" ] && break
  sleep 0.2
done

say "round 2: a second marketing job to every recipient (cap: 1 a day)"
jobs_file r2 >"$work/r2.jsonl"
"$bin" publish --config "$config" --file "$work/r2.jsonl" >/dev/null
for _ in $(seq 1 900); do
  [ "$(finals "$work/outcomes.jsonl")" -ge $((2 * n)) ] && break
  sleep 0.2
done
sleep 2 # late repeats of final outcomes, if any, come within this
kill "$tail_pid" 2>/dev/null || true

say "what happened"
curl -s http://127.0.0.1:18089/_sandbox/requests >"$work/requests.json"
rc=0
python3 - "$work" "$n" <<'PY' || rc=$?
import collections, json, sys
work, n = sys.argv[1], int(sys.argv[2])
finals = collections.defaultdict(list)
for line in open(f"{work}/outcomes.jsonl"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("status") in ("sent", "suppressed", "failed", "expired", "invalid", "duplicate"):
        finals[e["id"]].append(line.strip())
reqs = json.load(open(f"{work}/requests.json"))
ids = [r.get("callback_data") for r in reqs]
ids = [i for i in ids if i]
twice = [i for i, c in collections.Counter(ids).items() if c > 1]
def status(i):
    e = json.loads(finals[i][0])
    return e["status"] + ("/" + e["reason"] if e.get("reason") else "")
r1 = collections.Counter(status(f"r1-{i}") for i in range(1, n + 1) if finals[f"r1-{i}"])
r2 = collections.Counter(status(f"r2-{i}") for i in range(1, n + 1) if finals[f"r2-{i}"])
missing = [f"r{r}-{i}" for r in (1, 2) for i in range(1, n + 1) if not finals[f"r{r}-{i}"]]
differ = [i for i, v in finals.items() if len(set(v)) > 1]
print(f"round 1: {dict(r1)}")
print(f"round 2: {dict(r2)}")
print(f"API calls: {len(ids)}; job ids sent twice: {len(twice)}")
print(f"jobs without a final outcome: {len(missing)}; ids with two different final outcomes: {len(differ)}")
ok = not twice and not missing and not differ and r2 == {"suppressed/frequency_cap": n}
print("OK" if ok else "NOT OK")
sys.exit(0 if ok else 1)
PY
for name in a0 b0 a1 b1; do
  finished=$(curl -s "http://127.0.0.1:${port_of[$name]}/metrics" |
    awk '/^sendwell_jobs_finished_total/ { s += $NF } END { print s + 0 }')
  echo "$name (pid ${pid_of[$name]}): jobs finished since its start: $finished; $(curl -s "http://127.0.0.1:${port_of[$name]}/readyz" | head -n 2 | tr '\n' ' ')"
done
exit $rc
