#!/usr/bin/env bash
# Stop the daemons .ci/slurm/setup.sh started (sshd, slurmd, slurmctld, slurmdbd, MariaDB, munge).
# Only processes recorded in their pid files are signalled.
set -uo pipefail
QUIET=0; [ "${1:-}" = "--quiet" ] && QUIET=1
log() { [ "$QUIET" = 1 ] || echo "[slurm-teardown] $*"; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name="$1" pidfile="$2" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile" 2>/dev/null)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
    scancel --user=root 2>/dev/null || true
fi
stop_pidfile sshd /run/nemotron-ci-sshd.pid
[ -f /etc/ssh/ssh_known_hosts ] && sed -i '/ nemotron-ci-sshd$/d' /etc/ssh/ssh_known_hosts
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile slurmdbd /run/slurmdbd.pid
stop_pidfile mariadb /run/mysqld/mysqld.pid
stop_pidfile munged /run/munge/munged.pid
log "stopped"
exit 0
