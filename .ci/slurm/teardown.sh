#!/usr/bin/env bash
# Undo .ci/slurm/setup.sh: stop the daemons it started (only the processes recorded in its pid
# files, checked by name), remove the files it created outside its state directory
# (/etc/slurm/*.conf with the database password, the marked /etc/ssh/ssh_known_hosts line, the
# test sshd's keys) and the state directory itself (database, munge key, logs, spool).
# Does nothing when setup.sh left nothing; never touches a cluster it did not start.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=.ci/slurm/common.sh
source "$HERE/common.sh"
QUIET=0; [ "${1:-}" = "--quiet" ] && QUIET=1
log() { [ "$QUIET" = 1 ] || echo "[slurm-teardown] $*"; }

if [ ! -d "$STATE" ]; then
    log "nothing to do: $STATE does not exist"
    exit 0
fi

stop_pidfile() {  # stop_pidfile PIDFILE NAME: signal the pid only if it is still that daemon
    local pidfile="$1" name="$2" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile" 2>/dev/null)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# Cancel the CI cluster's jobs while it still answers (its own slurm.conf, written by setup).
if grep -qx /etc/slurm/slurm.conf "$STATE/created" 2>/dev/null && command -v scancel >/dev/null \
    && scontrol ping >/dev/null 2>&1; then
    scancel --user=root 2>/dev/null || true
fi
# Last started, first stopped.
if [ -f "$STATE/pids" ]; then
    tac "$STATE/pids" | while read -r pidfile name; do stop_pidfile "$pidfile" "$name"; done
fi

[ -f /etc/ssh/ssh_known_hosts ] && sed -i "/ ${KNOWN_HOSTS_MARK}\$/d" /etc/ssh/ssh_known_hosts
# setup.sh authorizes its key through its own file only; a root authorized_keys holding it
# (written by an older setup.sh) loses that line.
ROOT_KEYS="$(getent passwd root | cut -d: -f6)/.ssh/authorized_keys"
if [ -f "$SSH_DIR/id_ed25519.pub" ] && [ -f "$ROOT_KEYS" ]; then
    KEY="$(cut -d' ' -f2 "$SSH_DIR/id_ed25519.pub")"
    grep -qF "$KEY" "$ROOT_KEYS" && sed -i "\|$KEY|d" "$ROOT_KEYS" && log "removed the CI key from $ROOT_KEYS"
fi
# Created files and directories, newest first (a directory is removed only once empty).
if [ -f "$STATE/created" ]; then
    tac "$STATE/created" | while read -r path; do
        if [ -d "$path" ] && [ ! -L "$path" ]; then
            if [ "$path" = "$SSH_DIR" ]; then rm -rf "$path"; else rmdir "$path" 2>/dev/null; fi
        elif [ "$path" = /etc/ssh/ssh_known_hosts ]; then
            [ -s "$path" ] || rm -f "$path"  # only if nothing but our line was in it
        else
            rm -f "$path"
        fi
        log "removed $path"
    done
fi
rm -rf "$STATE"
log "stopped; removed $STATE"
exit 0
