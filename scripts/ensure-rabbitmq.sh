#!/usr/bin/env bash
# Makes sure a local RabbitMQ is installed, has the plugins sendwell needs, and is running.
# Idempotent: does nothing that is already done. Debian/Ubuntu (apt); needs root for installs.
set -euo pipefail

log() { echo "ensure-rabbitmq: $*" >&2; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  log "installing rabbitmq-server from the distribution's packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
fi
export PATH="$PATH:/usr/sbin:/usr/lib/rabbitmq/bin"

# rabbitmq_consistent_hash_exchange: sendwell.jobs routes recipients to shards (CONTRACT §1).
# rabbitmq_management: the tests create one vhost per test through its HTTP API.
# Offline mode writes the enabled_plugins file whether or not the broker is running; a running
# broker is told below.
$SUDO rabbitmq-plugins --offline enable rabbitmq_consistent_hash_exchange rabbitmq_management >/dev/null

running() { $SUDO rabbitmqctl -q status >/dev/null 2>&1; }

if ! running; then
  log "starting rabbitmq-server"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl start rabbitmq-server || $SUDO rabbitmq-server -detached
  else
    $SUDO rabbitmq-server -detached
  fi
fi

# Wait (bounded) for the broker and its plugins to be up.
for _ in $(seq 1 120); do
  if $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
$SUDO rabbitmqctl -q await_startup

# A broker that was already running when the plugins were enabled offline needs to be told.
$SUDO rabbitmq-plugins enable rabbitmq_consistent_hash_exchange rabbitmq_management >/dev/null
for _ in $(seq 1 60); do
  if curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1; then break; fi
  sleep 1
done
log "RabbitMQ is running with rabbitmq_consistent_hash_exchange enabled"
