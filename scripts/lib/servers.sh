# shellcheck shell=bash
# Starts the real servers callfleet's tests and benchmarks need — MariaDB and Redis — as the
# current user, in a temporary folder, on free loopback ports, and stops them on exit.
# Sourced by scripts/test and scripts/bench-*; exports CALLFLEET_TEST_MYSQL_URL and
# CALLFLEET_TEST_REDIS_URL.

cf_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs what the tests need and is missing; extra `PATH-TO-CHECK=PACKAGE` arguments add
# more (./scripts/test-asterisk adds Kamailio).
cf_install_packages() {
    local missing=() extra
    for extra in "$@"; do
        [ -e "${extra%%=*}" ] || missing+=("${extra#*=}")
    done
    command -v mariadbd >/dev/null || missing+=(mariadb-server mariadb-client)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v sipp >/dev/null || missing+=(sip-tester)
    command -v faketime >/dev/null || missing+=(faketime)
    [ ${#missing[@]} -eq 0 ] && return 0
    cf_log "installing ${missing[*]} from Debian's packages"
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    # Keep the packages' own services from starting (we run our own instances), and leave
    # the machine's policy as it was afterwards.
    local made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        "${missing[@]}" >/dev/null
    [ -n "$made_policy" ] && "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    return 0
}

cf_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

cf_wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 1 150); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    cf_log "$what did not start; its log follows"
    return 1
}

cf_start_mariadb() {
    CF_MYSQL_DIR=$CF_TMP/mariadb
    CF_MYSQL_PORT=$(cf_free_port)
    CF_MYSQL_SOCKET=$CF_MYSQL_DIR/mysqld.sock
    mkdir -p "$CF_MYSQL_DIR/data"
    mariadb-install-db --no-defaults --datadir="$CF_MYSQL_DIR/data" --user="$(id -un)" \
        --auth-root-authentication-method=socket --skip-test-db >"$CF_MYSQL_DIR/install.log" 2>&1 \
        || { cat "$CF_MYSQL_DIR/install.log" >&2; return 1; }
    cf_mariadbd_launch
    cf_wait_for "MariaDB" mariadb --no-defaults -S "$CF_MYSQL_SOCKET" -u "$(id -un)" -e 'SELECT 1' \
        || { tail -30 "$CF_MYSQL_DIR/mysqld.log" >&2; return 1; }
    mariadb --no-defaults -S "$CF_MYSQL_SOCKET" -u "$(id -un)" <<'SQL'
CREATE DATABASE IF NOT EXISTS callfleet;
CREATE USER IF NOT EXISTS 'callfleet'@'127.0.0.1' IDENTIFIED BY 'callfleet';
GRANT ALL PRIVILEGES ON *.* TO 'callfleet'@'127.0.0.1';
SQL
    export CALLFLEET_TEST_MYSQL_URL="mysql://callfleet:callfleet@127.0.0.1:$CF_MYSQL_PORT/callfleet"
    # Lets tests and demos stop and restart this very server (store-outage scenarios).
    export CALLFLEET_TEST_MYSQL_PIDFILE=$CF_MYSQL_DIR/mysqld.pid
    cf_log "MariaDB on 127.0.0.1:$CF_MYSQL_PORT"
}

# Starts mariadbd on the prepared data dir (also used to restart it after an outage).
cf_mariadbd_launch() {
    mariadbd --no-defaults --datadir="$CF_MYSQL_DIR/data" --socket="$CF_MYSQL_SOCKET" \
        --pid-file="$CF_MYSQL_DIR/mysqld.pid" --port="$CF_MYSQL_PORT" --bind-address=127.0.0.1 \
        --user="$(id -un)" --skip-name-resolve --innodb-buffer-pool-size=128M \
        --innodb-flush-log-at-trx-commit=2 --max-connections=2000 \
        --log-error="$CF_MYSQL_DIR/mysqld.log" >/dev/null 2>&1 &
}

cf_start_redis() {
    CF_REDIS_PORT=$(cf_free_port)
    mkdir -p "$CF_TMP/redis"
    redis-server --port "$CF_REDIS_PORT" --bind 127.0.0.1 --dir "$CF_TMP/redis" \
        --appendonly yes --maxmemory-policy noeviction --save '' \
        --pidfile "$CF_TMP/redis/redis.pid" --logfile "$CF_TMP/redis/redis.log" --daemonize yes
    cf_wait_for "Redis" redis-cli -p "$CF_REDIS_PORT" ping || { tail -30 "$CF_TMP/redis/redis.log" >&2; return 1; }
    export CALLFLEET_TEST_REDIS_URL="redis://127.0.0.1:$CF_REDIS_PORT/"
    cf_log "Redis on 127.0.0.1:$CF_REDIS_PORT"
}

cf_stop_servers() {
    local pid
    for pidfile in "$CF_TMP/mariadb/mysqld.pid" "$CF_TMP/redis/redis.pid" \
        "$CF_TMP/moto/moto.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$CF_TMP"
}

cf_servers_up() {
    CF_TMP=$(mktemp -d -t callfleet-test.XXXXXX)
    trap cf_stop_servers EXIT
    trap 'exit 130' INT TERM
    cf_start_mariadb
    cf_start_redis
}

# MariaDB only, for suites that need the store but not Redis (./scripts/test-asterisk):
# the same temporary folder, server and clean-up as cf_servers_up.
cf_mariadb_up() {
    CF_TMP=$(mktemp -d -t callfleet-test.XXXXXX)
    trap cf_stop_servers EXIT
    trap 'exit 130' INT TERM
    cf_start_mariadb
}
