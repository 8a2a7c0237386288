#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (Debian packages): munge, MariaDB,
# slurmdbd (accounting, so that `sacct` works: NeMo-Run polls job state with it), slurmctld and
# slurmd. Needs root. Undo with teardown.sh, which removes everything this script created.
#
# It leaves the machine as it found it:
# - it refuses to run when a Slurm or munge daemon already runs here, or when /etc/slurm holds
#   a configuration it did not write (it never stops or overwrites someone else's cluster);
# - every daemon's state, logs, pid file, socket, database and key live under $STATE; the only
#   files outside it are /etc/slurm/slurm.conf and slurmdbd.conf (the client tools read them
#   there; the database password is in slurmdbd.conf), recorded in $STATE/created, and one
#   marked line of /etc/ssh/ssh_known_hosts; teardown.sh removes exactly those;
# - every port is picked free at start (none is fixed); $STATE/env records them for the tests.
#   Packages installed by apt stay installed, without starting their services.
#
# It also starts an sshd on 127.0.0.1:$SLURM_CI_SSH_PORT that accepts only a key generated here
# ($SSH_DIR/id_ed25519, authorized through its own file: nothing under ~/.ssh is touched), so
# that submissions through an SSH tunnel (tunnel = "ssh") are tested too.
#
#   SLURM_CI_CPUS       CPUs the node offers (default 2)
#   SLURM_CI_ACCOUNT    Slurm account created for the jobs (default "ci")
#   SLURM_CI_SSH        1 (default) = start the test sshd, 0 = no sshd
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=.ci/slurm/common.sh
source "$HERE/common.sh"
CPUS="${SLURM_CI_CPUS:-2}"
ACCOUNT="${SLURM_CI_ACCOUNT:-ci}"
WITH_SSH="${SLURM_CI_SSH:-1}"
CLUSTER="nemotron-ci"
NODE="$(hostname -s)"
DB_PASS="slurm-ci-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

log() { echo "[slurm-setup] $*"; }
die() { echo "[slurm-setup] error: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"; shift 2
    for _ in $(seq 1 "$((seconds * 2))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "timed out after ${seconds}s waiting for: $what"
    for f in "$STATE"/log/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }; done
    return 1
}

free_port() {  # a TCP port nothing listens on right now
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

track() {  # track PATH: record a file or directory this script is about to create
    [ -e "$1" ] || echo "$1" >>"$STATE/created"
}

[ "$(id -u)" = 0 ] || die "must run as root"

if [ -d "$STATE" ]; then
    log "removing what a previous run of this script left"
    "$HERE/teardown.sh" --quiet
fi
for daemon in slurmctld slurmd slurmdbd munged; do
    if pgrep -x "$daemon" >/dev/null; then
        die "$daemon already runs on this machine (pid $(pgrep -x "$daemon" | head -1)): not starting a CI cluster beside it, nor stopping it; run the tests against it (NEMOTRON_SLURM_REQUIRED=1 pytest tests/launch -m slurm) or stop it first"
    fi
done
if grep -qsx "ClusterName=nemotron-ci" /etc/slurm/slurm.conf; then
    # Left by an older version of this script, whose teardown kept the configs (no daemon runs).
    log "removing the CI configs an older setup.sh left: ${SLURM_CONFS[*]}"
    rm -f "${SLURM_CONFS[@]}"
fi
for conf in "${SLURM_CONFS[@]}"; do
    if [ -e "$conf" ]; then die "$conf exists and was not written by this script: not overwriting it"; fi
done

export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null \
    || ! command -v python3 >/dev/null \
    || { [ "$WITH_SSH" = 1 ] && [ ! -x /usr/sbin/sshd ]; }; then
    log "installing packages"
    # Packages must not start their services (a system MariaDB or munged would outlive us).
    no_start=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        no_start=1
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurmdbd slurm-client munge mariadb-server \
        openssh-server openssh-client rsync python3 >/dev/null
    [ "$no_start" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$STATE" && chmod 755 "$STATE"
: >"$STATE/created"
mkdir -p "$STATE/log" "$STATE/run" "$STATE/slurmctld" "$STATE/slurmd" "$STATE/munge"
chown slurm:slurm "$STATE/log" "$STATE/slurmctld"
chmod 777 "$STATE/log"  # every daemon (munge, mysql, slurm) writes its log here

CTLD_PORT="$(free_port)"; SLURMD_PORT="$(free_port)"; DBD_PORT="$(free_port)"
MYSQL_PORT="$(free_port)"; SSH_PORT=0
[ "$WITH_SSH" = 1 ] && SSH_PORT="$(free_port)"

log "starting munge (key in $STATE/munge, socket $MUNGE_SOCKET)"
# The socket stays at munge's default path: Slurm 22.05's client tools ignore AuthInfo=socket
# for their connection to slurmdbd. No munged runs (checked above), so the path is free.
chown munge:munge "$STATE/munge" && chmod 755 "$STATE/munge"
dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" status=none
chown munge:munge "$STATE/munge/munge.key" && chmod 400 "$STATE/munge/munge.key"
track "$(dirname "$MUNGE_SOCKET")"
mkdir -p "$(dirname "$MUNGE_SOCKET")" && chown munge:munge "$(dirname "$MUNGE_SOCKET")"
track "$MUNGE_SOCKET"
track "$MUNGE_SOCKET.lock"
runuser -u munge -- /usr/sbin/munged --key-file="$STATE/munge/munge.key" \
    --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
echo "$STATE/munge/munged.pid munged" >>"$STATE/pids"
wait_for 20 "munge" bash -c "munge -n | unmunge"

log "starting MariaDB (data in $STATE/mysql, 127.0.0.1:$MYSQL_PORT)"
mkdir -p "$STATE/mysql" "$STATE/mysqld" && chown mysql:mysql "$STATE/mysql" "$STATE/mysqld"
mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket >/dev/null
(runuser -u mysql -- /usr/sbin/mariadbd --no-defaults --datadir="$STATE/mysql" \
    --pid-file="$STATE/mysqld/mysqld.pid" --socket="$STATE/mysqld/mysqld.sock" \
    --bind-address=127.0.0.1 --port="$MYSQL_PORT" >"$STATE/log/mariadb.log" 2>&1 &)
echo "$STATE/mysqld/mysqld.pid mariadbd" >>"$STATE/pids"
wait_for 60 "MariaDB" mariadb --socket="$STATE/mysqld/mysqld.sock" -e "select 1"
mariadb --socket="$STATE/mysqld/mysqld.sock" <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '${DB_PASS}';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

log "writing ${SLURM_CONFS[*]} (node $NODE, CPUs=$CPUS)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
track /etc/slurm
mkdir -p /etc/slurm
track /etc/slurm/slurmdbd.conf
cat >/etc/slurm/slurmdbd.conf <<CONF
# Written by nemotron .ci/slurm/setup.sh; removed by teardown.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=${DBD_PORT}
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${MYSQL_PORT}
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
LogFile=${STATE}/log/slurmdbd.log
PidFile=${STATE}/run/slurmdbd.pid
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
track /etc/slurm/slurm.conf
cat >/etc/slurm/slurm.conf <<CONF
# Written by nemotron .ci/slurm/setup.sh; removed by teardown.sh.
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
StateSaveLocation=${STATE}/slurmctld
SlurmdSpoolDir=${STATE}/slurmd
SlurmctldPidFile=${STATE}/run/slurmctld.pid
SlurmdPidFile=${STATE}/run/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
# No systemd/cgroups in CI containers: track processes by /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=${DBD_PORT}
# Jobs must name an account the user belongs to, as on a production cluster.
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
MinJobAge=300
KillWait=10
NodeName=${NODE} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF

log "starting slurmdbd (port $DBD_PORT)"
/usr/sbin/slurmdbd
echo "$STATE/run/slurmdbd.pid slurmdbd" >>"$STATE/pids"
wait_for 60 "slurmdbd" sacctmgr -n show cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null || true
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="CI" Organization="CI" >/dev/null || true
sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null || true

log "starting slurmctld (port $CTLD_PORT) and slurmd (port $SLURMD_PORT)"
/usr/sbin/slurmctld
echo "$STATE/run/slurmctld.pid slurmctld" >>"$STATE/pids"
wait_for 60 "slurmctld" scontrol ping
/usr/sbin/slurmd
echo "$STATE/run/slurmd.pid slurmd" >>"$STATE/pids"
wait_for 60 "node $NODE idle" bash -c "sinfo -h -N -n '$NODE' -o '%T' | grep -qx idle"
wait_for 60 "sacct" sacct -n -X -S now

if [ "$WITH_SSH" = 1 ]; then
    log "starting sshd on 127.0.0.1:$SSH_PORT (key $SSH_DIR/id_ed25519)"
    track "$SSH_DIR"
    mkdir -p "$SSH_DIR" && chmod 700 "$SSH_DIR"
    mkdir -p /run/sshd  # sshd's privilege-separation directory (left in place: /run is volatile)
    ssh-keygen -q -t ed25519 -N "" -C nemotron-ci -f "$SSH_DIR/host_ed25519"
    ssh-keygen -q -t ed25519 -N "" -C nemotron-ci -f "$SSH_DIR/id_ed25519"
    cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
    /usr/sbin/sshd -p "$SSH_PORT" -o ListenAddress=127.0.0.1 -h "$SSH_DIR/host_ed25519" \
        -o PidFile="$STATE/run/sshd.pid" -o AuthorizedKeysFile="$SSH_DIR/authorized_keys" \
        -o PasswordAuthentication=no -o PermitRootLogin=prohibit-password -o StrictModes=no
    echo "$STATE/run/sshd.pid sshd" >>"$STATE/pids"
    # Known to ssh (rsync copies the job over it) as a user's cluster would be; teardown
    # removes the marked line (and the file, if this script created it).
    track /etc/ssh/ssh_known_hosts
    touch /etc/ssh/ssh_known_hosts
    echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSH_DIR/host_ed25519.pub") $KNOWN_HOSTS_MARK" \
        >>/etc/ssh/ssh_known_hosts
    wait_for 20 "sshd" ssh -p "$SSH_PORT" -i "$SSH_DIR/id_ed25519" -o BatchMode=yes \
        -o LogLevel=ERROR "$(id -un)@127.0.0.1" sinfo
fi

cat >"$STATE/env" <<ENV
SLURM_CI_SSH_PORT=$SSH_PORT
SLURM_CI_ACCOUNT=$ACCOUNT
ENV
sinfo
log "cluster up: node $NODE, account $ACCOUNT, state in $STATE (ports: slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, MariaDB $MYSQL_PORT, sshd $SSH_PORT)"
