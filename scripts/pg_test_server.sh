#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store tests (tests/test_store_pg.py), on 127.0.0.1 only.
#
#   scripts/pg_test_server.sh start DIR   # initdb + start in DIR (a new or empty directory); prints the DSN
#   scripts/pg_test_server.sh dsn DIR     # prints the DSN of the server running in DIR
#   scripts/pg_test_server.sh stop DIR    # stops it and removes DIR
#   scripts/pg_test_server.sh pause DIR   # stops it, keeping DIR (an outage)
#   scripts/pg_test_server.sh resume DIR  # starts it again on the same port
#
# The DSN is postgresql://postgres@127.0.0.1:PORT/qianjiang_test: superuser "postgres", trust
# authentication from 127.0.0.1 only, no Unix socket, a free port picked at start. Only the DSN
# goes to stdout (DSN=$(scripts/pg_test_server.sh start DIR)); progress and errors go to stderr.
#
# The cluster belongs to whoever runs the script; run as root, it belongs to the "postgres"
# system user (initdb refuses root), and DIR is chowned to it. The server binaries are looked
# for under /usr/lib/postgresql/*/bin (newest first), then pg_config --bindir, then PATH; if
# none is found and we are root on Debian, the "postgresql" package is installed with apt-get
# (without its default cluster, so nothing else starts or listens). QJ_PG_NO_INSTALL=1 turns the
# install off (the test suite's own fallback uses it). Durability settings are PostgreSQL's
# defaults (fsync, synchronous_commit on); the cluster is small and starts in a few seconds.
#
# start is idempotent (a running server: prints its DSN; a stopped one in DIR: restarts it);
# stop is too (nothing there: nothing to do). DIR is only ever deleted if this script made it
# a server directory (marker file), so a mistyped DIR is refused, not wiped.
set -euo pipefail

DB_NAME=qianjiang_test
SUPERUSER=postgres
MARKER=.qj-pg-test-server

die() { echo "pg_test_server: $*" >&2; exit 1; }
say() { echo "pg_test_server: $*" >&2; }

usage() { die "usage: $0 start|stop|dsn|pause|resume DIR"; }
[ $# -eq 2 ] || usage
CMD=$1
DIR=$2
[ -n "$DIR" ] || usage
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
DATA="$DIR/data"
LOG="$DIR/server.log"

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

# Run a server-side command as the cluster's owner: ourselves, or "postgres" when we are root.
as_owner() {
    if [ "$IS_ROOT" -eq 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && su -s /bin/bash postgres -c "$(printf '%q ' "$@")")
    fi
}

find_bindir() {
    local d
    # Debian/Ubuntu layout, newest major version first.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    fi
    d=$(command -v initdb 2>/dev/null || true)
    if [ -n "$d" ]; then
        d=$(dirname "$(readlink -f "$d")")
        [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    fi
    return 1
}

install_postgresql() {
    [ "${QJ_PG_NO_INSTALL:-0}" = 1 ] && die "no PostgreSQL server binaries (initdb) found, and QJ_PG_NO_INSTALL=1"
    [ "$IS_ROOT" -eq 1 ] || die "no PostgreSQL server binaries (initdb) found; install PostgreSQL (Debian: apt-get install postgresql) or run this as root"
    command -v apt-get >/dev/null 2>&1 || die "no PostgreSQL server binaries (initdb) found and no apt-get to install them"
    say "installing PostgreSQL with apt-get (no default cluster)"
    # Debian's package would create and start a cluster "main" on port 5432; this documented
    # switch stops that, so the only server is the one below. Our file is kept over the package's.
    mkdir -p /etc/postgresql-common
    [ -e /etc/postgresql-common/createcluster.conf ] ||
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
    local apt=(env DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get install -y -q --no-install-recommends
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql)
    if ! "${apt[@]}" >&2 </dev/null; then
        apt-get update -q >&2 </dev/null
        "${apt[@]}" >&2 </dev/null
    fi
}

is_running() { [ -f "$DATA/PG_VERSION" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }
port_of() { sed -n "s/^port = \([0-9]*\).*/\1/p" "$DATA/postgresql.conf" | tail -n 1; }
dsn() { echo "postgresql://$SUPERUSER@127.0.0.1:$(port_of)/$DB_NAME"; }

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    else
        echo $((20000 + RANDOM % 40000))
    fi
}

# Our settings go last in postgresql.conf, so they win; a restart rewrites the port line.
configure() {
    local port=$1
    sed -i '/^# qj-test-server$/,$d' "$DATA/postgresql.conf"
    cat >> "$DATA/postgresql.conf" <<EOF
# qj-test-server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
EOF
    # Trust from 127.0.0.1 only (no Unix socket, no ::1, no replication).
    echo "host all all 127.0.0.1/32 trust" > "$DATA/pg_hba.conf"
}

start_server() {
    local tries port
    for tries in 1 2 3 4 5; do
        port=$(free_port)
        configure "$port"
        if as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 30 start >/dev/null 2>&1; then
            return 0
        fi
        # Most likely the port was taken between picking and binding: try another.
        say "start on port $port failed (try $tries):"
        tail -n 3 "$LOG" >&2 || true
    done
    die "could not start PostgreSQL in $DATA (log: $LOG)"
}

create_database() {
    local port psql
    port=$(port_of)
    psql=("$BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U "$SUPERUSER" -d postgres -v ON_ERROR_STOP=1 -At)
    if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" ]; then
        "${psql[@]}" -c "CREATE DATABASE $DB_NAME" >/dev/null
    fi
}

cmd_start() {
    BIN=$(find_bindir) || { install_postgresql; BIN=$(find_bindir) || die "PostgreSQL installed, but no initdb found"; }
    if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -e "$DIR/$MARKER" ]; then
        die "$DIR is not empty and not a test server directory: refusing to use it"
    fi
    mkdir -p "$DIR"
    touch "$DIR/$MARKER"
    chmod 700 "$DIR"
    if [ "$IS_ROOT" -eq 1 ]; then
        id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' system user to own the cluster"
        chown postgres: "$DIR"
        as_owner test -w "$DIR" ||
            die "user postgres cannot write $DIR (is a parent directory closed to it?); use a directory under /tmp"
    fi
    if is_running; then
        dsn
        return 0
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        rm -rf "$DATA"
        as_owner "$BIN/initdb" -D "$DATA" -U "$SUPERUSER" -A trust -E UTF8 --locale=C --no-sync \
            >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    fi
    start_server
    create_database
    say "PostgreSQL $("$BIN/pg_ctl" --version | awk '{print $3}') running in $DATA on 127.0.0.1:$(port_of)"
    dsn
}

cmd_dsn() {
    BIN=$(find_bindir) || die "no PostgreSQL server binaries found"
    is_running || die "no test server is running in $DIR"
    dsn
}

cmd_stop() {
    [ -e "$DIR" ] || return 0
    [ -e "$DIR/$MARKER" ] || die "$DIR is not a test server directory: refusing to remove it"
    if [ -f "$DATA/PG_VERSION" ] && BIN=$(find_bindir); then
        if is_running; then
            as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
                as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
                die "could not stop the server in $DATA"
        fi
    fi
    rm -rf "$DIR"
}

# An outage and its end, for the store-outage tests: the server stops (fast shutdown, clients
# are disconnected) and later starts again on the same port with the same data.
cmd_pause() {
    [ -e "$DIR/$MARKER" ] || die "$DIR is not a test server directory"
    BIN=$(find_bindir) || die "no PostgreSQL server binaries found"
    is_running || return 0
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || die "could not stop the server in $DATA"
}

cmd_resume() {
    [ -e "$DIR/$MARKER" ] || die "$DIR is not a test server directory"
    BIN=$(find_bindir) || die "no PostgreSQL server binaries found"
    is_running && { dsn; return 0; }
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 30 start >/dev/null 2>&1 || die "could not restart the server in $DATA"
    dsn
}

case "$CMD" in
    start) cmd_start ;;
    dsn) cmd_dsn ;;
    stop) cmd_stop ;;
    pause) cmd_pause ;;
    resume) cmd_resume ;;
    *) usage ;;
esac
