#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis that the tests use are installed and answering on
# 127.0.0.1 (5432 and 6379). On this project's machines both run already; on a bare Debian
# machine this installs and starts them. Idempotent, and quiet when all is well.
set -euo pipefail

wait_for() {  # wait_for NAME COMMAND...: up to 30 s
    local name=$1; shift
    for _ in $(seq 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "ensure-services: $name did not come up" >&2; return 1
}

apt_install() {
    echo "ensure-services: installing $*" >&2
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres_ready() { pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql
    version=$(ls /etc/postgresql | sort -V | tail -1)
    # The tests connect over TCP as the postgres superuser without a password.
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' \
        "/etc/postgresql/$version/main/pg_hba.conf"
fi
if ! postgres_ready; then
    echo "ensure-services: starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    wait_for PostgreSQL postgres_ready
fi

if ! command -v redis-server >/dev/null; then
    apt_install redis-server
fi
if ! redis_ready; then
    echo "ensure-services: starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis_ready
fi
