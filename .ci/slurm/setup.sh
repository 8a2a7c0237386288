#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (Debian packages): munge, MariaDB,
# slurmdbd (accounting, so that `sacct` works: NeMo-Run polls job state with it), slurmctld and
# slurmd. Needs root. Idempotent: stops what a previous run left first. Undo with teardown.sh.
#
# It also starts an sshd on 127.0.0.1:$SLURM_CI_SSH_PORT that accepts only a key generated here
# ($SSH_DIR/id_ed25519, authorized through its own file, nothing under ~/.ssh is touched), so
# that submissions through an SSH tunnel (tunnel = "ssh") are tested too.
#
#   SLURM_CI_CPUS       CPUs the node offers (default 2)
#   SLURM_CI_ACCOUNT    Slurm account created for the jobs (default "ci")
#   SLURM_CI_SSH_PORT   port of the test sshd (default 2222; 0 = no sshd)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CPUS="${SLURM_CI_CPUS:-2}"
ACCOUNT="${SLURM_CI_ACCOUNT:-ci}"
CLUSTER="nemotron-ci"
NODE="$(hostname -s)"
DB_PASS="slurm-ci-$(date +%s)"
SSH_PORT="${SLURM_CI_SSH_PORT:-2222}"
SSH_DIR=/var/lib/nemotron-ci-ssh
LOG_DIR=/var/log/slurm

log() { echo "[slurm-setup] $*"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"; shift 2
    for _ in $(seq 1 "$((seconds * 2))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "timed out after ${seconds}s waiting for: $what"
    for f in "$LOG_DIR"/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }; done
    return 1
}

if [ "$(id -u)" != 0 ]; then log "must run as root"; exit 1; fi

log "installing packages"
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null \
    || { [ "$SSH_PORT" != 0 ] && [ ! -x /usr/sbin/sshd ]; }; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurmdbd slurm-client munge mariadb-server \
        openssh-server openssh-client rsync >/dev/null
fi

"$HERE/teardown.sh" --quiet || true

mkdir -p /etc/slurm "$LOG_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /run/munge
chown slurm:slurm "$LOG_DIR" /var/lib/slurm/slurmctld
chown munge:munge /run/munge

log "starting munge"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
runuser -u munge -- /usr/sbin/munged
wait_for 20 "munge" bash -c 'munge -n | unmunge'

log "starting MariaDB"
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if [ ! -d /var/lib/mysql/mysql ]; then mariadb-install-db --user=mysql >/dev/null; fi
(runuser -u mysql -- /usr/sbin/mariadbd --pid-file=/run/mysqld/mysqld.pid \
    --socket=/run/mysqld/mysqld.sock >"$LOG_DIR/mariadb.log" 2>&1 &)
wait_for 60 "MariaDB" mariadb -e "select 1"
mariadb <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

log "writing /etc/slurm/slurm.conf and slurmdbd.conf (node $NODE, CPUs=$CPUS)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
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
# Jobs must name an account the user belongs to, as on a production cluster.
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
MinJobAge=300
KillWait=10
NodeName=${NODE} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF

log "starting slurmdbd"
/usr/sbin/slurmdbd
wait_for 60 "slurmdbd" sacctmgr -n show cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null || true
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="CI" Organization="CI" >/dev/null || true
sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null || true

log "starting slurmctld and slurmd"
/usr/sbin/slurmctld
wait_for 60 "slurmctld" scontrol ping
/usr/sbin/slurmd
wait_for 60 "node $NODE idle" bash -c "sinfo -h -N -n '$NODE' -o '%T' | grep -qx idle"
wait_for 60 "sacct" sacct -n -X -S now

if [ "$SSH_PORT" != 0 ]; then
    log "starting sshd on 127.0.0.1:$SSH_PORT (key $SSH_DIR/id_ed25519)"
    mkdir -p "$SSH_DIR" /run/sshd && chmod 700 "$SSH_DIR"
    [ -f "$SSH_DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/host_ed25519"
    [ -f "$SSH_DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/id_ed25519"
    cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
    /usr/sbin/sshd -p "$SSH_PORT" -o ListenAddress=127.0.0.1 -h "$SSH_DIR/host_ed25519" \
        -o PidFile=/run/nemotron-ci-sshd.pid -o AuthorizedKeysFile="$SSH_DIR/authorized_keys" \
        -o PasswordAuthentication=no -o PermitRootLogin=prohibit-password -o StrictModes=no
    # Known to ssh (rsync copies the job over it) as a user's cluster would be; teardown removes it.
    touch /etc/ssh/ssh_known_hosts
    sed -i '/ nemotron-ci-sshd$/d' /etc/ssh/ssh_known_hosts
    echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSH_DIR/host_ed25519.pub") nemotron-ci-sshd" \
        >>/etc/ssh/ssh_known_hosts
    wait_for 20 "sshd" ssh -p "$SSH_PORT" -i "$SSH_DIR/id_ed25519" -o BatchMode=yes \
        -o LogLevel=ERROR \
        "$(id -un)@127.0.0.1" sinfo
fi
sinfo
log "cluster up: node $NODE, account $ACCOUNT"
