#!/usr/bin/env bash
# Makes sure a local PostgreSQL (15 or newer) is installed and running on 127.0.0.1:5432, with a
# role `sendwell` (LOGIN CREATEDB: the tests create one database per test) and a database
# `sendwell` it owns. Idempotent: does nothing that is already done. Debian/Ubuntu (apt); needs
# root (or sudo) for installs and for acting as the `postgres` superuser.
#
# SENDWELL_PG_PASSWORD: the role's password (default `sendwell`, for local tests only); it is set
# when the role is created, never changed afterwards, and checked by logging in over TCP.
# SENDWELL_PG_PORT / SENDWELL_PG_CLUSTER (default 5432 / main): only for trying this script on a
# throw-away cluster without touching the shared one.
set -euo pipefail

log() { echo "ensure-postgres: $*" >&2; }
die() { log "$*"; exit 1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PORT="${SENDWELL_PG_PORT:-5432}"
CLUSTER="${SENDWELL_PG_CLUSTER:-main}"
PASSWORD="${SENDWELL_PG_PASSWORD:-sendwell}"
MIN_MAJOR=15

# Newest installed server major ("" when none). Server binaries live per major version.
newest_server() {
  local d v best=""
  for d in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$d" ] || continue
    v="${d#/usr/lib/postgresql/}"
    v="${v%%/*}"
    if [ -z "$best" ] || [ "$v" -gt "$best" ]; then best="$v"; fi
  done
  echo "$best"
}

if [ -z "$(newest_server)" ] || ! command -v pg_lsclusters >/dev/null 2>&1; then
  log "installing postgresql from the distribution's packages"
  $SUDO apt-get update -qq
  # The package's postinst creates and starts a `main` cluster where it can; whatever it leaves
  # undone is done below.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  [ -n "$(newest_server)" ] || die "no PostgreSQL server under /usr/lib/postgresql after installing"
fi

# The version of the cluster $CLUSTER when one exists (whichever major it is; a throw-away
# cluster of another major must not make us create a second one on the same port); otherwise
# the newest major that has a cluster; with no cluster at all, the newest installed server.
VER="$({ pg_lsclusters -h 2>/dev/null || true; } | awk -v c="$CLUSTER" '$2 == c {print $1}' | sort -n | tail -n1)"
if [ -z "$VER" ]; then
  VER="$({ pg_lsclusters -h 2>/dev/null || true; } | awk '{print $1}' | sort -n | tail -n1)"
fi
if [ -z "$VER" ]; then VER="$(newest_server)"; fi
if [ "${VER%%.*}" -lt "$MIN_MAJOR" ]; then
  die "PostgreSQL $VER is the newest here; sendwell needs $MIN_MAJOR or newer (DROP DATABASE ... WITH (FORCE), WAL_LOG database creation)"
fi
[ -x "/usr/lib/postgresql/$VER/bin/postgres" ] \
  || die "cluster(s) of PostgreSQL $VER exist but its server is not installed (apt-get install postgresql-$VER)"

# Columns of `pg_lsclusters -h`: version cluster port status owner datadir logfile.
cluster_line() { { pg_lsclusters -h 2>/dev/null || true; } | awk -v v="$VER" -v c="$CLUSTER" '$1 == v && $2 == c'; }

if [ -z "$(cluster_line)" ]; then
  log "creating cluster $VER/$CLUSTER on port $PORT"
  $SUDO pg_createcluster "$VER" "$CLUSTER" --port "$PORT" >/dev/null
fi
CPORT="$(cluster_line | awk '{print $3}')"
[ "$CPORT" = "$PORT" ] \
  || die "cluster $VER/$CLUSTER listens on port $CPORT, not $PORT (see /etc/postgresql/$VER/$CLUSTER/postgresql.conf)"

case "$(cluster_line | awk '{print $4}')" in
  online*) ;;
  *)
    log "starting cluster $VER/$CLUSTER"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      $SUDO systemctl start "postgresql@$VER-$CLUSTER"
    else
      $SUDO pg_ctlcluster "$VER" "$CLUSTER" start
    fi
    ;;
esac

# Bounded wait for the server to accept connections over TCP (what sendwell and the tests use).
ready=""
for _ in $(seq 1 60); do
  if pg_isready -q -h 127.0.0.1 -p "$PORT" -t 2; then ready=1; break; fi
  sleep 1
done
[ -n "$ready" ] || die "PostgreSQL $VER/$CLUSTER is not accepting connections on 127.0.0.1:$PORT after 60 s (log: /var/log/postgresql/postgresql-$VER-$CLUSTER.log)"

# As the superuser over the local socket (peer authentication), no password needed.
as_postgres() {
  $SUDO runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"
}
exists() { [ "$(as_postgres -Atc "$1")" = "1" ]; }

if exists "SELECT 1 FROM pg_roles WHERE rolname = 'sendwell'"; then
  role_state="exists"
else
  log "creating role sendwell (LOGIN CREATEDB)"
  # The password goes through stdin (never argv, where `ps` shows it) as a quoted literal;
  # terse verbosity keeps psql from echoing the statement if it fails.
  quoted="${PASSWORD//\'/\'\'}"
  as_postgres <<SQL
\set VERBOSITY terse
CREATE ROLE sendwell LOGIN CREATEDB PASSWORD '$quoted';
SQL
  role_state="created"
fi

if exists "SELECT 1 FROM pg_database WHERE datname = 'sendwell'"; then
  db_state="exists"
else
  log "creating database sendwell owned by sendwell"
  as_postgres -c "CREATE DATABASE sendwell OWNER sendwell"
  db_state="created"
fi

# What sendwell and the tests do: password login over TCP (scram-sha-256 in Debian's default
# pg_hba.conf for 127.0.0.1). A role created earlier with another password fails here.
if ! PGPASSWORD="$PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -w -q -At -h 127.0.0.1 -p "$PORT" \
  -U sendwell -d sendwell -c 'SELECT 1' >/dev/null 2>&1; then
  die "role sendwell cannot log in to database sendwell on 127.0.0.1:$PORT with the password from SENDWELL_PG_PASSWORD (or the default): check the role's password (ALTER ROLE sendwell PASSWORD ...) and /etc/postgresql/$VER/$CLUSTER/pg_hba.conf"
fi
log "PostgreSQL $VER/$CLUSTER is running on 127.0.0.1:$PORT; role sendwell $role_state, database sendwell $db_state; password login works"
